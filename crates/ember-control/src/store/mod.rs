//! The store: every durable fact of the control plane, in SQLite (embedded
//! default) or PostgreSQL (several control-plane replicas sharing one database).
//!
//! One implementation serves both through `sqlx::Any`, so the SQL is written
//! once: portable types only (BIGINT, TEXT), `$N` placeholders (SQLite accepts
//! them too), `RETURNING`, `ON CONFLICT`. The two dialect differences (WAL on
//! SQLite, advisory locks on PostgreSQL) are branches on [`Backend`].
//!
//! Concurrency rule: every state change is a compare-and-set in one SQL
//! statement (`UPDATE … WHERE state IN (expected…)`), never read-modify-write
//! in Rust, so of N concurrent callers (tasks or replicas) exactly one wins.
//! Every query that a team can reach is scoped by `team_id` in SQL.
//!
//! Not here: deciding what to change (the API, reconciler and TTL sweeper do)
//! or talking to hosts.

mod migrations;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};
use crate::model::{
    ApiKey, AuditEntry, Build, BuildKind, Host, HostCredential, HostUsage, Ingress, JoinToken,
    NetworkPolicy, OnTimeout, Sandbox, SandboxState, Team, Template, TemplateBuild,
};

/// Which database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// Filters for listing sandboxes. All given filters must match.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    pub states: Vec<SandboxState>,
    pub template: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Destroyed sandboxes are hidden unless asked for by state.
    pub include_destroyed: bool,
}

/// Keyset pagination position: the last row of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageAfter {
    pub created_at: i64,
    pub id: String,
}

/// A capacity check done in the same statement as a state change, so two
/// concurrent placements cannot both take the last free vCPU.
#[derive(Debug, Clone)]
pub struct CapacityCheck {
    pub host_id: String,
    pub vcpus_total: u64,
    pub memory_mib_total: u64,
    /// The sandbox's team and its ceilings, checked in the same statement.
    pub team_id: String,
    pub quota: TeamQuota,
}

/// What one team may hold at once (`None`: no limit). Running counts every
/// state that holds host resources (creating, running, resuming, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamQuota {
    pub running_sandboxes: Option<u64>,
    pub vcpus: Option<u64>,
    pub memory_mib: Option<u64>,
    pub paused_sandboxes: Option<u64>,
    pub templates: Option<u64>,
    /// MiB of the builds its paused sandboxes and templates hold.
    pub storage_mib: Option<u64>,
}

/// How an insert of a template ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateInsert {
    Inserted,
    /// The team has a template of that name.
    NameTaken,
    /// The team would hold `would` templates, over its quota.
    OverQuota {
        would: u64,
    },
}

/// What one team holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamUsage {
    pub running_sandboxes: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub paused_sandboxes: u64,
    pub templates: u64,
    /// Bytes of the builds its paused sandboxes and templates hold (each
    /// build's own files: a diff generation counts the blocks it wrote).
    pub storage_bytes: u64,
}

impl TeamUsage {
    /// [`TeamUsage::storage_bytes`] in MiB, rounded up.
    pub fn storage_mib(&self) -> u64 {
        self.storage_bytes.div_ceil(1 << 20)
    }
}

fn limit(v: Option<u64>) -> i64 {
    v.map_or(i64::MAX, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// SQL conditions that a team stays within its quota once a sandbox of
/// (`vcpus`, `memory`: SQL expressions) joins its occupying ones; `$t` is
/// the team, then its three limits.
fn team_quota_sql(t: usize, vcpus: &str, memory: &str) -> String {
    let occupying = state_list(&SandboxState::OCCUPYING);
    let of_team = format!("FROM sandboxes q WHERE q.team_id = ${t} AND q.state IN ({occupying})");
    format!(
        " AND (SELECT COUNT(*) {of_team}) + 1 <= ${r} \
          AND (SELECT COALESCE(SUM(q.vcpus), 0) {of_team}) + {vcpus} <= ${v} \
          AND (SELECT COALESCE(SUM(q.memory_mib), 0) {of_team}) + {memory} <= ${m}",
        r = t + 1,
        v = t + 2,
        m = t + 3
    )
}

/// The columns a transition changes besides `state` and `state_changed_at`.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub failure_reason: Option<String>,
    pub build_id: Option<String>,
    /// `Some(None)` clears the expiry.
    pub expires_at: Option<Option<i64>>,
    pub destroyed_at: Option<i64>,
    pub last_operation: Option<crate::model::OperationTiming>,
}

const SANDBOX_COLUMNS: &str = "id, team_id, state, host_id, template, source_build_id, build_id, \
     vcpus, memory_mib, metadata, env, network, timeout_s, on_timeout, expires_at, \
     access_token_sha256, failure_reason, created_at, state_changed_at, destroyed_at, \
     last_operation, ingress";

fn state_list(states: &[SandboxState]) -> String {
    // State names are compile-time constants, so inlining them is not injection.
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// A stable 63-bit key for PostgreSQL advisory locks.
fn lock_key(name: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(b) >> 1) as i64
}

fn corrupt(what: &'static str, detail: impl ToString) -> Error {
    Error::CorruptRow {
        what,
        detail: detail.to_string(),
    }
}

fn opt_u64(v: Option<i64>) -> u64 {
    v.unwrap_or(0).max(0) as u64
}

impl Store {
    /// Connect, set the database up and apply pending migrations.
    ///
    /// `url` is `sqlite://PATH` (created if missing) or `postgres://…`.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            let mut u = format!("sqlite:{rest}");
            if !rest.contains("mode=") {
                u.push_str(if rest.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
            (Backend::Sqlite, u)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(Error::DatabaseUrl(url.to_owned()));
        };
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(30));
        options = match backend {
            // SQLite serialises writers anyway; a few readers run beside them in WAL mode.
            Backend::Sqlite => options.max_connections(8),
            Backend::Postgres => options.max_connections(16),
        };
        let pool = options.connect(&url).await?;
        let store = Store { pool, backend };
        if backend == Backend::Sqlite {
            // WAL is a property of the file: readers never block the writer.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&store.pool)
                .await?;
        }
        migrations::apply(&store).await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    #[doc(hidden)]
    pub fn pool_for_bench(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Close the pool (tests drop databases afterwards).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Run a raw query; for tests and diagnostics only.
    #[doc(hidden)]
    pub async fn fetch_all_text(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        let mut out = Vec::new();
        for row in rows {
            let mut cells = Vec::new();
            for i in 0..row.len() {
                let text = row
                    .try_get::<Option<String>, _>(i)
                    .ok()
                    .flatten()
                    .or_else(|| {
                        row.try_get::<Option<i64>, _>(i)
                            .ok()
                            .flatten()
                            .map(|v| v.to_string())
                    });
                cells.push(text);
            }
            out.push(cells);
        }
        Ok(out)
    }

    /// Run `f` while holding the cluster-wide lock `name`: a PostgreSQL
    /// advisory lock, so replicas starting together take turns. (An SQLite
    /// file is served by one process; nothing is needed there.)
    pub async fn exclusive<T, F, Fut>(&self, name: &str, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        if self.backend != Backend::Postgres {
            return f().await;
        }
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(lock_key(name))
            .execute(&mut *conn)
            .await?;
        let result = f().await;
        let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(lock_key(name))
            .execute(&mut *conn)
            .await;
        if unlock.is_err() {
            // Closing the session releases the lock for certain.
            drop(conn.detach());
        }
        result
    }

    // ------------------------------------------------------------ settings

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    /// Store `value` under `key` unless something is there already; return
    /// what is stored (so concurrent first starts agree on one value).
    pub async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(self.setting(key).await?.unwrap_or_else(|| value.to_owned()))
    }

    /// Store `value` under `key`, replacing what is there.
    pub async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ------------------------------------------------------------ teams

    /// Insert a team; false if its name is taken.
    pub async fn insert_team(&self, team: &Team) -> Result<bool> {
        let res = sqlx::query(
            "INSERT INTO teams (id, name, is_admin, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&team.id)
        .bind(&team.name)
        .bind(i64::from(team.is_admin))
        .bind(team.created_at)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn team(&self, id: &str) -> Result<Option<Team>> {
        let row = sqlx::query("SELECT id, name, is_admin, created_at FROM teams WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| team_from_row(&r)))
    }

    pub async fn team_by_name(&self, name: &str) -> Result<Option<Team>> {
        let row = sqlx::query("SELECT id, name, is_admin, created_at FROM teams WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| team_from_row(&r)))
    }

    pub async fn list_teams(&self) -> Result<Vec<Team>> {
        let rows =
            sqlx::query("SELECT id, name, is_admin, created_at FROM teams ORDER BY created_at, id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(team_from_row).collect())
    }

    pub async fn count_teams(&self) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM teams")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        Ok(n as u64)
    }

    // ------------------------------------------------------------ API keys

    /// Insert a key; false if its prefix collides with an existing one.
    pub async fn insert_key(&self, key: &ApiKey) -> Result<bool> {
        let res = sqlx::query(
            "INSERT INTO api_keys (prefix, team_id, name, secret_sha256, created_at, last_used_at, revoked_at, role, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&key.prefix)
        .bind(&key.team_id)
        .bind(&key.name)
        .bind(&key.secret_sha256)
        .bind(key.created_at)
        .bind(key.last_used_at)
        .bind(key.revoked_at)
        .bind(key.role.as_str())
        .bind(key.expires_at)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// How many keys exist, revoked ones included.
    pub async fn count_keys(&self) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        Ok(n.max(0) as u64)
    }

    /// The key with this prefix, revoked or not (the caller decides).
    pub async fn key(&self, prefix: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query(
            "SELECT prefix, team_id, name, secret_sha256, created_at, last_used_at, revoked_at, role, expires_at \
             FROM api_keys WHERE prefix = $1",
        )
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| key_from_row(&r)))
    }

    /// The key with this prefix and whether its team is an admin team, in
    /// one query (this is every request's authentication).
    pub async fn key_with_team(&self, prefix: &str) -> Result<Option<(ApiKey, bool)>> {
        let row = sqlx::query(
            "SELECT k.prefix, k.team_id, k.name, k.secret_sha256, k.created_at, k.last_used_at, k.revoked_at, k.role, k.expires_at, t.is_admin \
             FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.prefix = $1",
        )
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (key_from_row(&r), r.get::<i64, _>("is_admin") != 0)))
    }

    pub async fn list_keys(&self, team_id: &str) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(
            "SELECT prefix, team_id, name, secret_sha256, created_at, last_used_at, revoked_at, role, expires_at \
             FROM api_keys WHERE team_id = $1 ORDER BY created_at, prefix",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(key_from_row).collect())
    }

    /// Revoke a key of `team_id` (any team's when `None`, for admins). False
    /// if there is no such live key in scope.
    pub async fn revoke_key(&self, team_id: Option<&str>, prefix: &str, now: i64) -> Result<bool> {
        let res = match team_id {
            Some(team) => sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE prefix = $2 AND team_id = $3 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(prefix)
            .bind(team)
            .execute(&self.pool)
            .await?,
            None => sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE prefix = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(prefix)
            .execute(&self.pool)
            .await?,
        };
        Ok(res.rows_affected() == 1)
    }

    // ------------------------------------------------------------ audit log

    /// Append one entry. There is deliberately no update or delete.
    pub async fn insert_audit(&self, e: &AuditEntry) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (id, at, team_id, actor, method, route, target, status) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&e.id)
        .bind(e.at)
        .bind(&e.team_id)
        .bind(&e.actor)
        .bind(&e.method)
        .bind(&e.route)
        .bind(&e.target)
        .bind(i64::from(e.status))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Entries newest first: of one team when `team_id` is set, about one
    /// target when `target` is, older than the entry `before` when set (IDs
    /// are UUIDv7: they sort by time).
    pub async fn list_audit(
        &self,
        team_id: Option<&str>,
        target: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, team_id, actor, method, route, target, status FROM audit_log \
             WHERE ($1 IS NULL OR team_id = $1) AND ($2 IS NULL OR target = $2) AND ($3 IS NULL OR id < $3) \
             ORDER BY id DESC LIMIT $4",
        )
        .bind(team_id)
        .bind(target)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                id: r.get("id"),
                at: r.get("at"),
                team_id: r.get("team_id"),
                actor: r.get("actor"),
                method: r.get("method"),
                route: r.get("route"),
                target: r.get("target"),
                status: u16::try_from(r.get::<i64, _>("status")).unwrap_or(0),
            })
            .collect())
    }

    pub async fn touch_key(&self, prefix: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE prefix = $2")
            .bind(now)
            .bind(prefix)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ------------------------------------------------------------ hosts

    /// Insert a host, or update its address and capacity if it re-registers.
    pub async fn upsert_host(&self, host: &Host) -> Result<()> {
        sqlx::query(
            "INSERT INTO hosts (id, address, backend, version, vcpus_total, memory_mib_total, healthy, last_error, registered_at, last_seen_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, backend = excluded.backend, \
               version = excluded.version, vcpus_total = excluded.vcpus_total, \
               memory_mib_total = excluded.memory_mib_total, healthy = excluded.healthy, \
               last_error = excluded.last_error, last_seen_at = excluded.last_seen_at",
        )
        .bind(&host.id)
        .bind(&host.address)
        .bind(&host.backend)
        .bind(&host.version)
        .bind(i64::from(host.vcpus_total))
        .bind(host.memory_mib_total as i64)
        .bind(i64::from(host.healthy))
        .bind(host.last_error.clone())
        .bind(host.registered_at)
        .bind(host.last_seen_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn host(&self, id: &str) -> Result<Option<Host>> {
        let row = sqlx::query(
            "SELECT id, address, backend, version, vcpus_total, memory_mib_total, healthy, last_error, registered_at, last_seen_at \
             FROM hosts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| host_from_row(&r)))
    }

    pub async fn list_hosts(&self) -> Result<Vec<Host>> {
        let rows = sqlx::query(
            "SELECT id, address, backend, version, vcpus_total, memory_mib_total, healthy, last_error, registered_at, last_seen_at \
             FROM hosts ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(host_from_row).collect())
    }

    /// The credentials of host `id`, revoked or not.
    pub async fn host_credential(&self, id: &str) -> Result<Option<HostCredential>> {
        let row = sqlx::query(
            "SELECT host_id, credential_hash, control_token, tls_cert, issued_at, revoked_at \
             FROM host_credentials WHERE host_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(host_credential_from_row))
    }

    /// Every host's credentials, by host ID, in one query (the registry
    /// reads them on every probe round).
    pub async fn host_credentials(&self) -> Result<HashMap<String, HostCredential>> {
        let rows = sqlx::query(
            "SELECT host_id, credential_hash, control_token, tls_cert, issued_at, revoked_at \
             FROM host_credentials",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(host_credential_from_row)
            .map(|c| (c.host_id.clone(), c))
            .collect())
    }

    /// Record a host's credentials, replacing what it had.
    pub async fn put_host_credential(&self, c: &HostCredential) -> Result<()> {
        sqlx::query(
            "INSERT INTO host_credentials (host_id, credential_hash, control_token, tls_cert, issued_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (host_id) DO UPDATE SET credential_hash = excluded.credential_hash, \
               control_token = excluded.control_token, tls_cert = excluded.tls_cert, \
               issued_at = excluded.issued_at, revoked_at = excluded.revoked_at",
        )
        .bind(&c.host_id)
        .bind(c.credential_hash.clone())
        .bind(&c.control_token)
        .bind(c.tls_cert.clone())
        .bind(c.issued_at)
        .bind(c.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Revoke host `id`'s credentials (kept, marked, so the host cannot
    /// join again with the join token until it is removed). False if it has none.
    pub async fn revoke_host_credential(&self, id: &str, at: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE host_credentials SET revoked_at = COALESCE(revoked_at, $1) WHERE host_id = $2",
        )
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Forget host `id` and its credentials; the one-time join token that
    /// admitted it stops working (the machine needs a new one). False if
    /// there was no such host.
    pub async fn delete_host(&self, id: &str, now: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM host_credentials WHERE host_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE used_by_host = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn insert_join_token(&self, t: &JoinToken) -> Result<()> {
        sqlx::query(
            "INSERT INTO join_tokens (id, token_hash, created_at, expires_at, created_by, used_at, used_by_host, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&t.id)
        .bind(&t.token_hash)
        .bind(t.created_at)
        .bind(t.expires_at)
        .bind(t.created_by.clone())
        .bind(t.used_at)
        .bind(t.used_by_host.clone())
        .bind(t.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The join token whose SHA-256 is `hash`, in whatever state.
    pub async fn join_token_by_hash(&self, hash: &str) -> Result<Option<JoinToken>> {
        let row = sqlx::query(&format!(
            "SELECT {JOIN_TOKEN_COLUMNS} FROM join_tokens WHERE token_hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(join_token_from_row))
    }

    /// Join tokens, newest first: those still usable, and those used,
    /// revoked or expired since `since`.
    pub async fn list_join_tokens(&self, since: i64) -> Result<Vec<JoinToken>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOIN_TOKEN_COLUMNS} FROM join_tokens \
             WHERE created_at >= $1 OR expires_at >= $1 OR used_at >= $1 \
             ORDER BY created_at DESC, id DESC LIMIT 1000"
        ))
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(join_token_from_row).collect())
    }

    /// Bind join token `id` to `host_id` (its first use) in one statement:
    /// true if it is unrevoked, unexpired at `now`, and unused or already
    /// bound to that same host. Of two hosts racing for one token, one wins.
    pub async fn claim_join_token(&self, id: &str, host_id: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE join_tokens SET used_at = COALESCE(used_at, $1), used_by_host = $2 \
             WHERE id = $3 AND revoked_at IS NULL AND expires_at > $1 \
               AND (used_by_host IS NULL OR used_by_host = $2)",
        )
        .bind(now)
        .bind(host_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Revoke join token `id` (the first revocation's time stays). False
    /// if there is no such token.
    pub async fn revoke_join_token(&self, id: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Record a health probe's outcome.
    pub async fn set_host_health(
        &self,
        id: &str,
        healthy: bool,
        last_error: Option<&str>,
        seen_at: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE hosts SET healthy = $1, last_error = $2, last_seen_at = COALESCE($3, last_seen_at) WHERE id = $4",
        )
        .bind(i64::from(healthy))
        .bind(last_error.map(str::to_owned))
        .bind(seen_at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// vCPUs and memory reserved per host by sandboxes that hold a VM.
    pub async fn host_usage(&self) -> Result<HashMap<String, HostUsage>> {
        let sql = format!(
            "SELECT host_id, CAST(COALESCE(SUM(vcpus), 0) AS BIGINT), CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) \
             FROM sandboxes WHERE host_id IS NOT NULL AND state IN ({}) GROUP BY host_id",
            state_list(&SandboxState::OCCUPYING)
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    HostUsage {
                        vcpus: r.get::<i64, _>(1).max(0) as u64,
                        memory_mib: r.get::<i64, _>(2).max(0) as u64,
                    },
                )
            })
            .collect())
    }

    // ------------------------------------------------------------ builds and templates

    pub async fn insert_build(&self, build: &Build) -> Result<()> {
        insert_build_on(&self.pool, build).await
    }

    pub async fn build(&self, id: &str) -> Result<Option<Build>> {
        let row = sqlx::query(
            "SELECT id, team_id, host_id, kind, source_sandbox_id, vcpus, memory_mib, stored_bytes, created_at, released_at \
             FROM builds WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| build_from_row(&r)).transpose()
    }

    /// How many live things name this build: templates, and sandboxes (not
    /// destroyed) that started from it or were paused into it.
    pub async fn build_references(&self, build_id: &str) -> Result<u64> {
        let n: i64 = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM templates WHERE build_id = $1) + \
                    (SELECT COUNT(*) FROM sandboxes WHERE (source_build_id = $1 OR build_id = $1) AND state <> 'destroyed')",
        )
        .bind(build_id)
        .fetch_one(&self.pool)
        .await?
        .get(0);
        Ok(n.max(0) as u64)
    }

    /// Mark a build as no longer named by the control plane.
    pub async fn release_build(&self, build_id: &str, now: i64) -> Result<bool> {
        let res =
            sqlx::query("UPDATE builds SET released_at = $1 WHERE id = $2 AND released_at IS NULL")
                .bind(now)
                .bind(build_id)
                .execute(&self.pool)
                .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Record a template and its build atomically; false (and nothing
    /// written) if the team already has a template of that name.
    pub async fn insert_template(&self, build: &Build, template: &Template) -> Result<bool> {
        Ok(matches!(
            self.insert_template_within(build, template, None).await?,
            TemplateInsert::Inserted
        ))
    }

    /// [`Store::insert_template`], refused (nothing written) when the team
    /// would then hold more than `max` templates. Concurrent inserts cannot
    /// overrun it: the row is written before the count (SQLite's writer
    /// lock), and PostgreSQL inserts of one team take turns.
    pub async fn insert_template_within(
        &self,
        build: &Build,
        template: &Template,
        max: Option<u64>,
    ) -> Result<TemplateInsert> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres && max.is_some() {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(lock_key(&format!("team:{}", template.team_id)))
                .execute(&mut *tx)
                .await?;
        }
        insert_build_on(&mut *tx, build).await?;
        let res = sqlx::query(
            "INSERT INTO templates (id, team_id, name, build_id, vcpus, memory_mib, source_sandbox_id, size_bytes, created_at, defaults) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&template.id)
        .bind(&template.team_id)
        .bind(&template.name)
        .bind(&template.build_id)
        .bind(i64::from(template.vcpus))
        .bind(i64::from(template.memory_mib))
        .bind(template.source_sandbox_id.clone())
        .bind(template.size_bytes as i64)
        .bind(template.created_at)
        .bind(
            template
                .defaults
                .as_ref()
                .map(|d| serde_json::to_string(d).expect("defaults serialize")),
        )
        .execute(&mut *tx)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                tx.rollback().await?;
                return Ok(TemplateInsert::NameTaken);
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(max) = max {
            let (held,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM templates WHERE team_id = $1")
                    .bind(&template.team_id)
                    .fetch_one(&mut *tx)
                    .await?;
            let held = u64::try_from(held).unwrap_or(0);
            if held > max {
                tx.rollback().await?;
                return Ok(TemplateInsert::OverQuota { would: held });
            }
        }
        tx.commit().await?;
        Ok(TemplateInsert::Inserted)
    }

    pub async fn insert_template_build(&self, b: &TemplateBuild) -> Result<()> {
        sqlx::query(
            "INSERT INTO template_builds (id, team_id, name, status, source, step, steps_total, \
             step_text, error, log, log_dropped, sandbox_id, cached_steps, created_at, heartbeat_at, \
             finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(&b.id)
        .bind(&b.team_id)
        .bind(&b.name)
        .bind(&b.status)
        .bind(&b.source)
        .bind(i64::from(b.step))
        .bind(i64::from(b.steps_total))
        .bind(&b.step_text)
        .bind(&b.error)
        .bind(&b.log)
        .bind(b.log_dropped as i64)
        .bind(&b.sandbox_id)
        .bind(i64::from(b.cached_steps))
        .bind(b.created_at)
        .bind(b.heartbeat_at)
        .bind(b.finished_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Write a build's progress (everything but its identity).
    pub async fn update_template_build(&self, b: &TemplateBuild) -> Result<()> {
        sqlx::query(
            "UPDATE template_builds SET status = $2, step = $3, steps_total = $4, step_text = $5, \
             error = $6, log = $7, log_dropped = $8, sandbox_id = $9, cached_steps = $10, \
             finished_at = $11, heartbeat_at = $12 WHERE id = $1",
        )
        .bind(&b.id)
        .bind(&b.status)
        .bind(i64::from(b.step))
        .bind(i64::from(b.steps_total))
        .bind(&b.step_text)
        .bind(&b.error)
        .bind(&b.log)
        .bind(b.log_dropped as i64)
        .bind(&b.sandbox_id)
        .bind(i64::from(b.cached_steps))
        .bind(b.finished_at)
        .bind(b.heartbeat_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The build is still being run (by this control plane).
    pub async fn heartbeat_template_build(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE template_builds SET heartbeat_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn template_build(&self, team_id: &str, id: &str) -> Result<Option<TemplateBuild>> {
        let row = sqlx::query(&format!(
            "SELECT {TEMPLATE_BUILD_COLUMNS} FROM template_builds WHERE team_id = $1 AND id = $2"
        ))
        .bind(team_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| template_build_from_row(&r)))
    }

    /// A team's builds of one template name (all names when `None`), newest first.
    pub async fn list_template_builds(
        &self,
        team_id: &str,
        name: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TemplateBuild>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEMPLATE_BUILD_COLUMNS} FROM template_builds \
             WHERE team_id = $1 AND ($2 = '' OR name = $2) ORDER BY created_at DESC, id LIMIT $3"
        ))
        .bind(team_id)
        .bind(name.unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(template_build_from_row).collect())
    }

    /// Fail the active builds whose heartbeat stopped before `stale_before`
    /// (the control plane running them is gone). Returns how many.
    pub async fn fail_orphaned_template_builds(&self, stale_before: i64, now: i64) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE template_builds SET status = 'failed', finished_at = $2, \
             error = 'the control plane running this build stopped; start the build again' \
             WHERE status IN ('queued', 'running') AND heartbeat_at < $1",
        )
        .bind(stale_before)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    pub async fn template(&self, team_id: &str, name: &str) -> Result<Option<Template>> {
        let row = sqlx::query(
            "SELECT id, team_id, name, build_id, vcpus, memory_mib, source_sandbox_id, size_bytes, created_at, defaults \
             FROM templates WHERE team_id = $1 AND name = $2",
        )
        .bind(team_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| template_from_row(&r)))
    }

    /// A team's templates by name, without the step cache's hidden ones.
    pub async fn list_templates(&self, team_id: &str) -> Result<Vec<Template>> {
        let rows = sqlx::query(
            "SELECT id, team_id, name, build_id, vcpus, memory_mib, source_sandbox_id, size_bytes, created_at, defaults \
             FROM templates WHERE team_id = $1 AND name NOT LIKE '.%' ORDER BY name",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(template_from_row).collect())
    }

    /// Remove a team's template by name (the name is free at once) and mark
    /// its build released. Returns the removed template.
    pub async fn delete_template(
        &self,
        team_id: &str,
        name: &str,
        now: i64,
    ) -> Result<Option<Template>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "DELETE FROM templates WHERE team_id = $1 AND name = $2 \
             RETURNING id, team_id, name, build_id, vcpus, memory_mib, source_sandbox_id, size_bytes, created_at, defaults",
        )
        .bind(team_id)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let template = template_from_row(&row);
        sqlx::query("UPDATE builds SET released_at = $1 WHERE id = $2 AND released_at IS NULL")
            .bind(now)
            .bind(&template.build_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(template))
    }

    /// What team `team_id` holds now (see [`TeamUsage`]).
    pub async fn team_usage(&self, team_id: &str) -> Result<TeamUsage> {
        let occupying = state_list(&SandboxState::OCCUPYING);
        let paused = state_list(&[SandboxState::Paused, SandboxState::Pausing]);
        let sql = format!(
            "SELECT \
               (SELECT COUNT(*) FROM sandboxes WHERE team_id = $1 AND state IN ({occupying})), \
               CAST((SELECT COALESCE(SUM(vcpus), 0) FROM sandboxes WHERE team_id = $1 AND state IN ({occupying})) AS BIGINT), \
               CAST((SELECT COALESCE(SUM(memory_mib), 0) FROM sandboxes WHERE team_id = $1 AND state IN ({occupying})) AS BIGINT), \
               (SELECT COUNT(*) FROM sandboxes WHERE team_id = $1 AND state IN ({paused})), \
               (SELECT COUNT(*) FROM templates WHERE team_id = $1), \
               CAST((SELECT COALESCE(SUM(b.stored_bytes), 0) FROM builds b WHERE b.team_id = $1 AND b.id IN ( \
                 SELECT build_id FROM sandboxes WHERE team_id = $1 AND state IN ({paused}) AND build_id IS NOT NULL \
                 UNION SELECT build_id FROM templates WHERE team_id = $1)) AS BIGINT)"
        );
        let (r, v, m, p, t, s): (i64, i64, i64, i64, i64, i64) = sqlx::query_as(&sql)
            .bind(team_id)
            .fetch_one(&self.pool)
            .await?;
        let u = |x: i64| u64::try_from(x).unwrap_or(0);
        Ok(TeamUsage {
            running_sandboxes: u(r),
            vcpus: u(v),
            memory_mib: u(m),
            paused_sandboxes: u(p),
            templates: u(t),
            storage_bytes: u(s),
        })
    }

    // ------------------------------------------------------------ sandboxes

    /// Insert a new sandbox row, and its metadata rows. With a capacity
    /// check, the insert happens only if the host still has room for it
    /// (false otherwise); the check and the insert are one statement.
    pub async fn insert_sandbox(
        &self,
        sb: &Sandbox,
        capacity: Option<&CapacityCheck>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if let (Backend::Postgres, Some(cap)) = (self.backend, capacity) {
            // Serialise placements per host and per team across replicas;
            // released at commit (always host first, then team).
            for key in [cap.host_id.clone(), format!("team:{}", cap.team_id)] {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(lock_key(&key))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let metadata = serde_json::to_string(&sb.metadata).map_err(|e| corrupt("metadata", e))?;
        let env = serde_json::to_string(&sb.env).map_err(|e| corrupt("env", e))?;
        let network = serde_json::to_string(&sb.network).map_err(|e| corrupt("network", e))?;
        let mut sql = format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
             $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22"
        );
        if capacity.is_some() {
            let occupying = state_list(&SandboxState::OCCUPYING);
            sql.push_str(&format!(
                " WHERE (SELECT COALESCE(SUM(vcpus), 0) FROM sandboxes WHERE host_id = $23 AND state IN ({occupying})) + $8 <= $24 \
                   AND (SELECT COALESCE(SUM(memory_mib), 0) FROM sandboxes WHERE host_id = $23 AND state IN ({occupying})) + $9 <= $25"
            ));
            sql.push_str(&team_quota_sql(26, "$8", "$9"));
        }
        let mut q = sqlx::query(&sql)
            .bind(&sb.id)
            .bind(&sb.team_id)
            .bind(sb.state.as_str())
            .bind(sb.host_id.clone())
            .bind(&sb.template)
            .bind(sb.source_build_id.clone())
            .bind(sb.build_id.clone())
            .bind(i64::from(sb.vcpus))
            .bind(i64::from(sb.memory_mib))
            .bind(metadata)
            .bind(env)
            .bind(network)
            .bind(sb.timeout_s as i64)
            .bind(sb.on_timeout.as_str())
            .bind(sb.expires_at)
            .bind(&sb.access_token_sha256)
            .bind(sb.failure_reason.clone())
            .bind(sb.created_at)
            .bind(sb.state_changed_at)
            .bind(sb.destroyed_at)
            .bind(
                sb.last_operation
                    .as_ref()
                    .map(|t| serde_json::to_string(t).expect("timings serialise")),
            )
            .bind(serde_json::to_string(&sb.ingress).expect("ingress serialises"));
        if let Some(cap) = capacity {
            q = q
                .bind(&cap.host_id)
                .bind(cap.vcpus_total as i64)
                .bind(cap.memory_mib_total as i64)
                .bind(&cap.team_id)
                .bind(limit(cap.quota.running_sandboxes))
                .bind(limit(cap.quota.vcpus))
                .bind(limit(cap.quota.memory_mib));
        }
        let inserted = q.execute(&mut *tx).await?.rows_affected() == 1;
        if !inserted {
            tx.rollback().await?;
            return Ok(false);
        }
        for (k, v) in &sb.metadata {
            sqlx::query(
                "INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES ($1, $2, $3)",
            )
            .bind(&sb.id)
            .bind(k)
            .bind(v)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// A sandbox by ID, within a team (`None` = any team: the reconciler's and
    /// the access-token check's view). Destroyed rows are returned too.
    pub async fn sandbox(&self, team_id: Option<&str>, id: &str) -> Result<Option<Sandbox>> {
        let row = match team_id {
            Some(team) => {
                sqlx::query(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1 AND team_id = $2"
                ))
                .bind(id)
                .bind(team)
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(|r| sandbox_from_row(&r)).transpose()
    }

    /// A page of a team's sandboxes, newest first.
    pub async fn list_sandboxes(
        &self,
        team_id: &str,
        filter: &SandboxFilter,
        after: Option<&PageAfter>,
        limit: u32,
    ) -> Result<Vec<Sandbox>> {
        let mut sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes s WHERE team_id = $1");
        let mut n = 1;
        let mut binds: Vec<String> = Vec::new();
        if !filter.states.is_empty() {
            sql.push_str(&format!(" AND state IN ({})", state_list(&filter.states)));
        } else if !filter.include_destroyed {
            sql.push_str(" AND state <> 'destroyed'");
        }
        if let Some(t) = &filter.template {
            n += 1;
            sql.push_str(&format!(" AND template = ${n}"));
            binds.push(t.clone());
        }
        for (k, v) in &filter.metadata {
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id AND m.key = ${} AND m.value = ${})",
                n + 1,
                n + 2
            ));
            n += 2;
            binds.push(k.clone());
            binds.push(v.clone());
        }
        let mut after_binds = None;
        if let Some(a) = after {
            sql.push_str(&format!(
                " AND (created_at < ${} OR (created_at = ${} AND id < ${}))",
                n + 1,
                n + 1,
                n + 2
            ));
            n += 2;
            after_binds = Some(a);
        }
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT ${}",
            n + 1
        ));
        let mut q = sqlx::query(&sql).bind(team_id);
        for b in binds {
            q = q.bind(b);
        }
        if let Some(a) = after_binds {
            q = q.bind(a.created_at).bind(a.id.clone());
        }
        q = q.bind(i64::from(limit));
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Compare-and-set a sandbox's state: move it to `to` only if it is in one
    /// of `from` (and in `team_id`, when given; and, with a capacity check,
    /// only if its host has room). True if this call made the change.
    // Each argument is one part of the compare-and-set (scope, row, expected,
    // target, columns, clock, capacity); a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub async fn transition(
        &self,
        team_id: Option<&str>,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
        changes: &Changes,
        now: i64,
        capacity: Option<&CapacityCheck>,
    ) -> Result<bool> {
        let mut sql = String::from("UPDATE sandboxes SET state = $1, state_changed_at = $2");
        if to == SandboxState::Running {
            // The running clock restarts on create and resume only.
            sql.push_str(
                ", running_since = CASE WHEN state IN ('creating', 'resuming') THEN $2 ELSE running_since END",
            );
        }
        let mut n = 2;
        let mut push = |col: &str, sql: &mut String| {
            n += 1;
            sql.push_str(&format!(", {col} = ${n}"));
        };
        if changes.failure_reason.is_some() {
            push("failure_reason", &mut sql);
        }
        if changes.build_id.is_some() {
            push("build_id", &mut sql);
        }
        if changes.expires_at.is_some() {
            push("expires_at", &mut sql);
        }
        if changes.destroyed_at.is_some() {
            push("destroyed_at", &mut sql);
        }
        let last_operation = changes
            .last_operation
            .as_ref()
            .map(|t| serde_json::to_string(t).expect("timings serialise"));
        if last_operation.is_some() {
            push("last_operation", &mut sql);
        }
        n += 1;
        sql.push_str(&format!(
            " WHERE id = ${n} AND state IN ({})",
            state_list(from)
        ));
        if team_id.is_some() {
            n += 1;
            sql.push_str(&format!(" AND team_id = ${n}"));
        }
        if capacity.is_some() {
            let occupying = state_list(&SandboxState::OCCUPYING);
            sql.push_str(&format!(
                " AND (SELECT COALESCE(SUM(o.vcpus), 0) FROM sandboxes o WHERE o.host_id = ${h} AND o.state IN ({occupying})) + vcpus <= ${v} \
                  AND (SELECT COALESCE(SUM(o.memory_mib), 0) FROM sandboxes o WHERE o.host_id = ${h} AND o.state IN ({occupying})) + memory_mib <= ${m}",
                h = n + 1,
                v = n + 2,
                m = n + 3
            ));
            sql.push_str(&team_quota_sql(n + 4, "vcpus", "memory_mib"));
        }
        let mut q = sqlx::query(&sql).bind(to.as_str()).bind(now);
        if let Some(r) = &changes.failure_reason {
            q = q.bind(r.clone());
        }
        if let Some(b) = &changes.build_id {
            q = q.bind(b.clone());
        }
        if let Some(e) = changes.expires_at {
            q = q.bind(e);
        }
        if let Some(d) = changes.destroyed_at {
            q = q.bind(d);
        }
        if let Some(t) = last_operation {
            q = q.bind(t);
        }
        q = q.bind(id);
        if let Some(t) = team_id {
            q = q.bind(t);
        }
        if let Some(cap) = capacity {
            q = q
                .bind(&cap.host_id)
                .bind(cap.vcpus_total as i64)
                .bind(cap.memory_mib_total as i64)
                .bind(&cap.team_id)
                .bind(limit(cap.quota.running_sandboxes))
                .bind(limit(cap.quota.vcpus))
                .bind(limit(cap.quota.memory_mib));
        }
        let changed = if let (Backend::Postgres, Some(cap)) = (self.backend, capacity) {
            let mut tx = self.pool.begin().await?;
            for key in [cap.host_id.clone(), format!("team:{}", cap.team_id)] {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(lock_key(&key))
                    .execute(&mut *tx)
                    .await?;
            }
            let changed = q.execute(&mut *tx).await?.rows_affected() == 1;
            tx.commit().await?;
            changed
        } else {
            q.execute(&self.pool).await?.rows_affected() == 1
        };
        Ok(changed)
    }

    /// Set a running sandbox's expiry. With `only_later`, never moves it
    /// earlier (activity extends, it does not shorten). True if changed.
    pub async fn set_expiry(
        &self,
        team_id: Option<&str>,
        id: &str,
        expires_at: i64,
        only_later: bool,
    ) -> Result<bool> {
        let mut sql = String::from(
            "UPDATE sandboxes SET expires_at = $1 WHERE id = $2 AND state = 'running'",
        );
        if only_later {
            sql.push_str(" AND (expires_at IS NULL OR expires_at < $1)");
        }
        if team_id.is_some() {
            sql.push_str(" AND team_id = $3");
        }
        let mut q = sqlx::query(&sql).bind(expires_at).bind(id);
        if let Some(t) = team_id {
            q = q.bind(t);
        }
        Ok(q.execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Record a sandbox's new egress rules.
    pub async fn set_network(
        &self,
        team_id: &str,
        id: &str,
        network: &NetworkPolicy,
    ) -> Result<bool> {
        let json = serde_json::to_string(network).map_err(|e| corrupt("network", e))?;
        let res = sqlx::query("UPDATE sandboxes SET network = $1 WHERE id = $2 AND team_id = $3")
            .bind(json)
            .bind(id)
            .bind(team_id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Replace how a sandbox's ports may be reached.
    pub async fn set_ingress(&self, team_id: &str, id: &str, ingress: &Ingress) -> Result<bool> {
        let json = serde_json::to_string(ingress).map_err(|e| corrupt("ingress", e))?;
        let res = sqlx::query("UPDATE sandboxes SET ingress = $1 WHERE id = $2 AND team_id = $3")
            .bind(json)
            .bind(id)
            .bind(team_id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Change the timeout a sandbox is resumed with and extended by.
    pub async fn set_timeout(&self, team_id: &str, id: &str, timeout_s: u64) -> Result<bool> {
        let res = sqlx::query("UPDATE sandboxes SET timeout_s = $1 WHERE id = $2 AND team_id = $3")
            .bind(timeout_s as i64)
            .bind(id)
            .bind(team_id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Running sandboxes whose expiry has passed, oldest first.
    pub async fn expired_sandboxes(&self, now: i64, limit: u32) -> Result<Vec<Sandbox>> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = 'running' AND expires_at IS NOT NULL AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Running sandboxes that started running (create or resume) at or
    /// before `started_before`: past the server's maximum running time.
    pub async fn running_too_long(&self, started_before: i64, limit: u32) -> Result<Vec<Sandbox>> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = 'running' \
             AND COALESCE(running_since, state_changed_at) <= $1 \
             ORDER BY state_changed_at LIMIT $2"
        ))
        .bind(started_before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Sandboxes paused at or before `paused_before`: past the server's
    /// retention for paused sandboxes.
    pub async fn paused_too_long(&self, paused_before: i64, limit: u32) -> Result<Vec<Sandbox>> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = 'paused' AND state_changed_at <= $1 \
             ORDER BY state_changed_at LIMIT $2"
        ))
        .bind(paused_before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Every sandbox placed on a host that is not destroyed, plus those
    /// destroyed since `destroyed_since` (the reconciler still cares about them).
    pub async fn sandboxes_on_host(
        &self,
        host_id: &str,
        destroyed_since: i64,
    ) -> Result<Vec<Sandbox>> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE host_id = $1 \
             AND (state <> 'destroyed' OR destroyed_at >= $2)"
        ))
        .bind(host_id)
        .bind(destroyed_since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Delete destroyed sandboxes older than `before`. Returns how many.
    pub async fn purge_destroyed(&self, before: i64) -> Result<u64> {
        let res =
            sqlx::query("DELETE FROM sandboxes WHERE state = 'destroyed' AND destroyed_at < $1")
                .bind(before)
                .execute(&self.pool)
                .await?;
        Ok(res.rows_affected())
    }

    /// Delete audit entries older than `before` (the operator's
    /// `audit_retention_s`); how many went.
    pub async fn purge_audit(&self, before: i64) -> Result<u64> {
        let res = sqlx::query("DELETE FROM audit_log WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected())
    }

    /// How many sandboxes are in each state (for metrics).
    pub async fn count_by_state(&self) -> Result<Vec<(SandboxState, u64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM sandboxes GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let state: String = r.get(0);
            let n: i64 = r.get(1);
            let state = state.parse().map_err(|e| corrupt("sandbox state", e))?;
            out.push((state, n.max(0) as u64));
        }
        Ok(out)
    }
}

async fn insert_build_on<'e, E>(exec: E, build: &Build) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO builds (id, team_id, host_id, kind, source_sandbox_id, vcpus, memory_mib, stored_bytes, created_at, released_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&build.id)
    .bind(&build.team_id)
    .bind(&build.host_id)
    .bind(build.kind.as_str())
    .bind(build.source_sandbox_id.clone())
    .bind(i64::from(build.vcpus))
    .bind(i64::from(build.memory_mib))
    .bind(build.stored_bytes as i64)
    .bind(build.created_at)
    .bind(build.released_at)
    .execute(exec)
    .await?;
    Ok(())
}

fn team_from_row(r: &AnyRow) -> Team {
    Team {
        id: r.get("id"),
        name: r.get("name"),
        is_admin: r.get::<i64, _>("is_admin") != 0,
        created_at: r.get("created_at"),
    }
}

fn key_from_row(r: &AnyRow) -> ApiKey {
    ApiKey {
        prefix: r.get("prefix"),
        team_id: r.get("team_id"),
        name: r.get("name"),
        secret_sha256: r.get("secret_sha256"),
        created_at: r.get("created_at"),
        last_used_at: r.get("last_used_at"),
        revoked_at: r.get("revoked_at"),
        // The schema's default and every writer keep it one of the roles;
        // anything else grants the least.
        role: r
            .get::<String, _>("role")
            .parse()
            .unwrap_or(crate::auth::Role::ReadOnly),
        expires_at: r.get("expires_at"),
    }
}

const JOIN_TOKEN_COLUMNS: &str =
    "id, token_hash, created_at, expires_at, created_by, used_at, used_by_host, revoked_at";

fn join_token_from_row(r: &AnyRow) -> JoinToken {
    JoinToken {
        id: r.get("id"),
        token_hash: r.get("token_hash"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
        created_by: r.get("created_by"),
        used_at: r.get("used_at"),
        used_by_host: r.get("used_by_host"),
        revoked_at: r.get("revoked_at"),
    }
}

fn host_credential_from_row(r: &AnyRow) -> HostCredential {
    HostCredential {
        host_id: r.get("host_id"),
        credential_hash: r.get("credential_hash"),
        control_token: r.get("control_token"),
        tls_cert: r.get("tls_cert"),
        issued_at: r.get("issued_at"),
        revoked_at: r.get("revoked_at"),
    }
}

fn host_from_row(r: &AnyRow) -> Host {
    Host {
        id: r.get("id"),
        address: r.get("address"),
        backend: r.get("backend"),
        version: r.get("version"),
        vcpus_total: r.get::<i64, _>("vcpus_total").clamp(0, i64::from(u32::MAX)) as u32,
        memory_mib_total: opt_u64(Some(r.get("memory_mib_total"))),
        healthy: r.get::<i64, _>("healthy") != 0,
        last_error: r.get("last_error"),
        registered_at: r.get("registered_at"),
        last_seen_at: r.get("last_seen_at"),
    }
}

fn build_from_row(r: &AnyRow) -> Result<Build> {
    let kind = match r.get::<String, _>("kind").as_str() {
        "template" => BuildKind::Template,
        "pause" => BuildKind::Pause,
        other => return Err(corrupt("build kind", other)),
    };
    Ok(Build {
        id: r.get("id"),
        team_id: r.get("team_id"),
        host_id: r.get("host_id"),
        kind,
        source_sandbox_id: r.get("source_sandbox_id"),
        vcpus: r.get::<i64, _>("vcpus") as u32,
        memory_mib: r.get::<i64, _>("memory_mib") as u32,
        stored_bytes: opt_u64(Some(r.get("stored_bytes"))),
        created_at: r.get("created_at"),
        released_at: r.get("released_at"),
    })
}

const TEMPLATE_BUILD_COLUMNS: &str = "id, team_id, name, status, source, step, steps_total, \
     step_text, error, log, log_dropped, sandbox_id, cached_steps, created_at, heartbeat_at, finished_at";

fn template_build_from_row(r: &AnyRow) -> TemplateBuild {
    TemplateBuild {
        id: r.get("id"),
        team_id: r.get("team_id"),
        name: r.get("name"),
        status: r.get("status"),
        source: r.get("source"),
        step: r.get::<i64, _>("step") as u32,
        steps_total: r.get::<i64, _>("steps_total") as u32,
        step_text: r.get("step_text"),
        error: r.get("error"),
        log: r.get("log"),
        log_dropped: r.get::<i64, _>("log_dropped") as u64,
        sandbox_id: r.get("sandbox_id"),
        cached_steps: r.get::<i64, _>("cached_steps") as u32,
        created_at: r.get("created_at"),
        heartbeat_at: r.get("heartbeat_at"),
        finished_at: r.get("finished_at"),
    }
}

fn template_from_row(r: &AnyRow) -> Template {
    Template {
        id: r.get("id"),
        team_id: r.get("team_id"),
        name: r.get("name"),
        build_id: r.get("build_id"),
        vcpus: r.get::<i64, _>("vcpus") as u32,
        memory_mib: r.get::<i64, _>("memory_mib") as u32,
        source_sandbox_id: r.get("source_sandbox_id"),
        size_bytes: opt_u64(Some(r.get("size_bytes"))),
        created_at: r.get("created_at"),
        // Written by this code only; unreadable JSON means no defaults.
        defaults: r
            .get::<Option<String>, _>("defaults")
            .and_then(|j| serde_json::from_str(&j).ok()),
    }
}

fn sandbox_from_row(r: &AnyRow) -> Result<Sandbox> {
    let state: String = r.try_get("state")?;
    let on_timeout: String = r.try_get("on_timeout")?;
    let metadata: String = r.try_get("metadata")?;
    let env: String = r.try_get("env")?;
    let network: String = r.try_get("network")?;
    let ingress: String = r.try_get("ingress")?;
    Ok(Sandbox {
        id: r.try_get("id")?,
        team_id: r.try_get("team_id")?,
        state: state.parse().map_err(|e| corrupt("sandbox state", e))?,
        host_id: r.try_get("host_id")?,
        template: r.try_get("template")?,
        source_build_id: r.try_get("source_build_id")?,
        build_id: r.try_get("build_id")?,
        vcpus: r.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: r.try_get::<i64, _>("memory_mib")? as u32,
        metadata: serde_json::from_str(&metadata).map_err(|e| corrupt("sandbox metadata", e))?,
        env: serde_json::from_str(&env).map_err(|e| corrupt("sandbox env", e))?,
        network: serde_json::from_str::<NetworkPolicy>(&network)
            .map_err(|e| corrupt("sandbox network", e))?,
        timeout_s: opt_u64(Some(r.try_get("timeout_s")?)),
        on_timeout: on_timeout
            .parse::<OnTimeout>()
            .map_err(|e| corrupt("sandbox on_timeout", e))?,
        expires_at: r.try_get("expires_at")?,
        access_token_sha256: r.try_get("access_token_sha256")?,
        failure_reason: r.try_get("failure_reason")?,
        created_at: r.try_get("created_at")?,
        state_changed_at: r.try_get("state_changed_at")?,
        destroyed_at: r.try_get("destroyed_at")?,
        // Diagnostics only: an unreadable value is dropped, not an error.
        last_operation: r
            .try_get::<Option<String>, _>("last_operation")?
            .and_then(|t| serde_json::from_str(&t).ok()),
        ingress: serde_json::from_str(&ingress).map_err(|e| corrupt("sandbox ingress", e))?,
    })
}

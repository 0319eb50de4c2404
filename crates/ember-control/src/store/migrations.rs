//! Versioned schema migrations, embedded in the binary and applied on start.
//!
//! Each migration runs once, in its own transaction, and is recorded in
//! `schema_migrations`. On PostgreSQL, replicas starting together take an
//! advisory lock so exactly one applies them; SQLite has one writer anyway.
//! Migrations are append-only: an applied one is never edited.

use sqlx::{Acquire, Row};

use super::{Backend, Store, lock_key};
use crate::error::{Error, Result};

/// `(version, name, SQL)`, in order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "last_operation",
        include_str!("../../migrations/0002_last_operation.sql"),
    ),
    (
        3,
        "ingress",
        include_str!("../../migrations/0003_ingress.sql"),
    ),
    (
        4,
        "key_roles_audit",
        include_str!("../../migrations/0004_key_roles_audit.sql"),
    ),
    (
        5,
        "running_since",
        include_str!("../../migrations/0005_running_since.sql"),
    ),
    (
        6,
        "host_credentials",
        include_str!("../../migrations/0006_host_credentials.sql"),
    ),
    (
        7,
        "join_tokens",
        include_str!("../../migrations/0007_join_tokens.sql"),
    ),
    (
        8,
        "template_builds",
        include_str!("../../migrations/0008_template_builds.sql"),
    ),
];

/// The newest schema version this build knows.
pub const LATEST: i64 = 8;

pub(super) async fn apply(store: &Store) -> Result<()> {
    let mut conn = store.pool().acquire().await?;
    if store.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(lock_key("ember-migrations"))
            .execute(&mut *conn)
            .await?;
    }
    let result = apply_locked(&mut conn).await;
    if store.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(lock_key("ember-migrations"))
            .execute(&mut *conn)
            .await?;
    }
    result
}

async fn apply_locked(conn: &mut sqlx::AnyConnection) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    let current: i64 =
        sqlx::query("SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) FROM schema_migrations")
            .fetch_one(&mut *conn)
            .await?
            .get(0);
    if current > LATEST {
        return Err(Error::SchemaTooNew(current));
    }
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let wrap = |source| Error::Migration {
            version,
            name,
            source,
        };
        let mut tx = conn.begin().await.map_err(wrap)?;
        // One statement at a time: not every driver runs a multi-statement
        // string inside a transaction with arguments-free queries alike.
        for statement in statements(sql) {
            sqlx::query(&statement)
                .execute(&mut *tx)
                .await
                .map_err(wrap)?;
        }
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(version)
        .bind(name)
        .bind(crate::model::now_ms())
        .execute(&mut *tx)
        .await
        .map_err(wrap)?;
        tx.commit().await.map_err(wrap)?;
        tracing::info!(version, name, "applied schema migration");
    }
    Ok(())
}

/// Split a migration into statements: `;` ends a statement at the end of a
/// line; `--` comment lines are dropped. Migrations are written to this rule.
fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            out.push(current.trim().trim_end_matches(';').to_owned());
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_split_into_statements() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.0, i as i64 + 1);
            assert!(!statements(m.2).is_empty());
        }
        assert_eq!(MIGRATIONS.last().unwrap().0, LATEST);
        let s = statements("-- c\nCREATE TABLE a (x BIGINT);\n\nCREATE INDEX i\n  ON a (x);\n");
        assert_eq!(
            s,
            vec!["CREATE TABLE a (x BIGINT)", "CREATE INDEX i\n  ON a (x)"]
        );
    }
}

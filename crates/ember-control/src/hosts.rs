//! The registry of host agents: for each, a gRPC client (dialled over TLS
//! to the host's pinned certificate, with the host's own control token in
//! `authorization` metadata), its last `HostInfo`, its health, and a
//! backoff for probing it while it is down.
//!
//! Hosts are durable rows in the store; this registry is each replica's live
//! view of them. [`HostRegistry::register`] is how a host joins (the
//! internal registration endpoint calls it once the host's credential or
//! the join token checked out; `ember server` calls it for its embedded
//! agent). Each host's [`HostCredential`] lives in the store, so every
//! replica can dial every host. Not here: placement
//! ([`crate::scheduler`]) or lifecycle calls ([`crate::lifecycle`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ember_proto::host::host_agent_client::HostAgentClient;
use ember_proto::host::{HostInfoReply, HostInfoRequest};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::model::{Host, HostCredential, HostUsage, now_ms};
use crate::scheduler::HostSnapshot;
use crate::store::Store;

/// Adds `authorization: Bearer <host's control token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    pub fn new(token: &str) -> Option<BearerToken> {
        format!("Bearer {token}").parse().ok().map(BearerToken)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A client for one host agent.
pub type HostClient = HostAgentClient<InterceptedService<Channel, BearerToken>>;

/// Time limits on host calls.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(10);
/// Create, resume, pause and snapshot can boot or write a VM (seconds under TCG).
pub const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Pause and resume move a sandbox's whole memory, which for a large one
/// takes longer than any fixed bound a caller would wait: the API answers
/// `202 Accepted` after `answer_within` and the call runs on. This only
/// guards against a host that never answers (the row then settles from
/// the host's own report).
pub const LONG_OPERATION_TIMEOUT: Duration = Duration::from_secs(3600);

struct Entry {
    address: String,
    /// What the client was dialled with (control token and certificate),
    /// to notice a re-registration through another replica.
    link: String,
    client: HostClient,
    info: Option<HostInfoReply>,
    healthy: bool,
    failures: u32,
    next_probe: Instant,
    /// When this replica first failed to reach the host, since it last answered.
    unreachable_since: Option<Instant>,
}

/// Every host this replica knows, with a live client for each.
pub struct HostRegistry {
    store: Store,
    hosts: RwLock<HashMap<String, Entry>>,
}

impl std::fmt::Debug for HostRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self
            .hosts
            .read()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("HostRegistry").field("hosts", &ids).finish()
    }
}

/// What a client was dialled with, as one comparable string.
fn link_of(cred: &HostCredential) -> String {
    format!(
        "{}\n{}",
        cred.control_token,
        cred.tls_cert.as_deref().unwrap_or("")
    )
}

/// Probe delay after `failures` consecutive failures: 1 s for a healthy host,
/// doubling per failure up to 60 s.
pub fn backoff(failures: u32) -> Duration {
    let secs = 2u64.saturating_pow(failures.min(6)).min(60);
    Duration::from_secs(secs)
}

/// A tonic status as a short reason for humans.
pub fn status_reason(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// The gRPC metadata key a host agent puts on every error it answers with
/// (`ember_agent::error::ERROR_CODE_METADATA`).
pub const AGENT_ERROR_CODE: &str = "ember-error-code";

/// Does this status mean the host could not be reached (as opposed to the
/// host answering that the operation failed)? An error the agent itself
/// answered (it carries the agent's error code) never does: a guest that
/// does not answer is `Unavailable` too, and says nothing about the host.
pub fn is_unreachable(status: &tonic::Status) -> bool {
    if status.metadata().contains_key(AGENT_ERROR_CODE) {
        return false;
    }
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    ) && (status.code() != tonic::Code::Unknown || status.message().contains("transport"))
}

impl HostRegistry {
    /// An empty registry over `store`.
    pub fn new(store: Store) -> Arc<HostRegistry> {
        Arc::new(HostRegistry {
            store,
            hosts: RwLock::new(HashMap::new()),
        })
    }

    /// A lazily connecting client for the host at `address` with `cred`:
    /// `https://` addresses are dialled over TLS trusting only the host's
    /// pinned certificate; `http://` ones only on loopback (the agent
    /// `ember server` embeds).
    pub fn dial(address: &str, cred: &HostCredential) -> Result<HostClient> {
        let bad = |detail: String| Error::HostReply {
            host: address.to_owned(),
            call: "dial",
            detail,
        };
        let mut endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        match endpoint.uri().scheme_str() {
            Some("https") => {
                let cert = cred
                    .tls_cert
                    .as_deref()
                    .ok_or_else(|| bad("the host registered no TLS certificate to pin".into()))?;
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(cert))
                    .domain_name(ember_proto::AGENT_TLS_NAME);
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| bad(format!("TLS: {e}")))?;
            }
            Some("http") => {}
            _ => return Err(bad("the address needs a scheme: https://HOST:PORT".into())),
        }
        let token = BearerToken::new(&cred.control_token)
            .ok_or_else(|| bad("the host's control token is not valid in a header".into()))?;
        Ok(HostAgentClient::with_interceptor(
            endpoint.connect_lazy(),
            token,
        ))
    }

    /// Register (or re-register) the host agent listening at `address`,
    /// whose credentials (already checked by the caller) are `cred`: dial
    /// it, ask `HostInfo`, check it answers as `cred.host_id`, and record
    /// host and credentials.
    pub async fn register(&self, address: &str, cred: HostCredential) -> Result<Host> {
        let mut client = Self::dial(address, &cred)?;
        let mut req = tonic::Request::new(HostInfoRequest {});
        req.set_timeout(INFO_TIMEOUT);
        let info = client
            .host_info(req)
            .await
            .map_err(|s| Error::HostCall {
                host: address.to_owned(),
                call: "HostInfo",
                source: Box::new(s),
            })?
            .into_inner();
        if info.host_id != cred.host_id {
            return Err(Error::HostReply {
                host: address.to_owned(),
                call: "HostInfo",
                detail: format!(
                    "the agent there answers as host {:?}, not {:?}",
                    info.host_id, cred.host_id
                ),
            });
        }
        let now = now_ms();
        let previous = self.store.host(&info.host_id).await?;
        if let Some(p) = previous.as_ref().filter(|p| p.address != address) {
            self.refuse_a_live_twin(&info.host_id, &p.address).await?;
        }
        let host = Host {
            id: info.host_id.clone(),
            address: address.to_owned(),
            backend: info.backend.clone(),
            version: info.version.clone(),
            vcpus_total: info.vcpus_total,
            memory_mib_total: info.memory_mib_total,
            healthy: true,
            last_error: None,
            registered_at: previous.map_or(now, |p| p.registered_at),
            last_seen_at: Some(now),
        };
        self.store.put_host_credential(&cred).await?;
        self.store.upsert_host(&host).await?;
        let entry = Entry {
            address: address.to_owned(),
            link: link_of(&cred),
            client,
            info: Some(info),
            healthy: true,
            failures: 0,
            next_probe: Instant::now() + backoff(0),
            unreachable_since: None,
        };
        self.write().insert(host.id.clone(), entry);
        tracing::info!(host = %host.id, address = %host.address, "host registered");
        Ok(host)
    }

    /// Register the agent `ember server` runs in its own process, reached
    /// on loopback at `address`: its credentials are its control token and
    /// certificate (it never registers over HTTP, so it has no issued
    /// credential). Refused if the host was revoked.
    pub async fn register_local(
        &self,
        address: &str,
        host_id: &str,
        control_token: &str,
        tls_cert: Option<&str>,
    ) -> Result<Host> {
        let existing = self.store.host_credential(host_id).await?;
        if existing.as_ref().is_some_and(|c| c.revoked_at.is_some()) {
            return Err(Error::Config(format!(
                "host {host_id} (this server's own agent) was revoked; remove it \
                 (`ember host remove {host_id}`) before it may be attached again"
            )));
        }
        let cred = HostCredential {
            host_id: host_id.to_owned(),
            credential_hash: existing.and_then(|c| c.credential_hash),
            control_token: control_token.to_owned(),
            tls_cert: tls_cert.map(str::to_owned),
            issued_at: now_ms(),
            revoked_at: None,
        };
        self.register(address, cred).await
    }

    /// Stop calling host `id` (its credentials were revoked, or it was removed).
    pub fn forget(&self, id: &str) {
        self.write().remove(id);
    }

    /// A host ID moves to a new address only when the agent at the old one
    /// no longer answers as that host (it was restarted elsewhere, or its
    /// machine is gone). A live agent keeps its ID: whoever else holds the
    /// host's credential cannot register under it and receive its
    /// sandboxes' traffic.
    async fn refuse_a_live_twin(&self, host_id: &str, registered: &str) -> Result<()> {
        let known = self.read().get(host_id).map(|e| e.client.clone());
        let client = match known {
            Some(c) => Ok(c),
            None => match self.store.host_credential(host_id).await? {
                Some(cred) => Self::dial(registered, &cred),
                None => return Ok(()),
            },
        };
        let Ok(mut client) = client else {
            return Ok(());
        };
        let mut req = tonic::Request::new(HostInfoRequest {});
        req.set_timeout(INFO_TIMEOUT);
        match client.host_info(req).await {
            Ok(reply) if reply.get_ref().host_id == host_id => {
                tracing::warn!(host = %host_id, %registered, "refused a second agent claiming a live host's ID");
                Err(Error::HostIdTaken {
                    id: host_id.to_owned(),
                    registered: registered.to_owned(),
                })
            }
            _ => Ok(()),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.hosts.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.hosts.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Pick up hosts registered through other replicas (or before a
    /// restart), and drop the ones whose credentials were revoked.
    pub async fn load(&self) -> Result<()> {
        let rows = self.store.list_hosts().await?;
        let mut creds = self.store.host_credentials().await?;
        let mut fresh = Vec::new();
        let mut gone = Vec::new();
        for row in rows {
            let cred = creds.remove(&row.id).filter(|c| c.revoked_at.is_none());
            let Some(cred) = cred else {
                // Revoked, or registered by a version before per-host
                // credentials: it is called again once it re-joins.
                gone.push(row.id);
                continue;
            };
            let changed = self
                .read()
                .get(&row.id)
                .is_none_or(|e| e.address != row.address || e.link != link_of(&cred));
            if changed {
                fresh.push((row, cred));
            }
        }
        for id in gone {
            if self.write().remove(&id).is_some() {
                tracing::info!(host = %id, "stopped calling a host without valid credentials");
            }
        }
        for (row, cred) in fresh {
            match Self::dial(&row.address, &cred) {
                Ok(client) => {
                    let entry = Entry {
                        address: row.address.clone(),
                        link: link_of(&cred),
                        client,
                        info: None,
                        // Unknown until probed: the scheduler waits for a probe.
                        healthy: false,
                        failures: 0,
                        next_probe: Instant::now(),
                        unreachable_since: None,
                    };
                    self.write().insert(row.id.clone(), entry);
                }
                Err(err) => {
                    tracing::warn!(host = %row.id, error = %err, "stored host address is unusable")
                }
            }
        }
        Ok(())
    }

    /// The client for a host.
    pub fn client(&self, host_id: &str) -> Result<HostClient> {
        self.read()
            .get(host_id)
            .map(|e| e.client.clone())
            .ok_or_else(|| Error::UnknownHost {
                host: host_id.to_owned(),
            })
    }

    pub fn host_ids(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn is_healthy(&self, host_id: &str) -> bool {
        self.read().get(host_id).is_some_and(|e| e.healthy)
    }

    /// How long this replica has been failing to reach the host (zero while
    /// it answers, or before the first failure).
    pub fn unreachable_for(&self, host_id: &str) -> Duration {
        self.read()
            .get(host_id)
            .and_then(|e| e.unreachable_since)
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// The last `HostInfo` of every host that answered one.
    /// The last `HostInfo` of host `id`.
    pub fn info(&self, id: &str) -> Option<HostInfoReply> {
        self.read().get(id).and_then(|e| e.info.clone())
    }

    /// Where host `id` serves its sandboxes' ports itself
    /// (`{scheme}://{domain}`), if it does.
    pub fn ingress_url(&self, id: &str) -> Option<String> {
        self.read()
            .get(id)
            .and_then(|e| e.info.as_ref())
            .map(|i| i.ingress_url.clone())
            .filter(|u| !u.is_empty())
    }

    pub fn infos(&self) -> Vec<(String, HostInfoReply)> {
        self.read()
            .iter()
            .filter_map(|(id, e)| e.info.clone().map(|i| (id.clone(), i)))
            .collect()
    }

    /// What the scheduler sees: capacity from each host's last `HostInfo`,
    /// use from the database's reservations (fresher than any probe).
    pub fn snapshots(&self, usage: &HashMap<String, HostUsage>) -> Vec<HostSnapshot> {
        self.read()
            .iter()
            .filter_map(|(id, e)| {
                let info = e.info.as_ref()?;
                let used = usage.get(id).copied().unwrap_or_default();
                Some(HostSnapshot {
                    id: id.clone(),
                    healthy: e.healthy,
                    vcpus_total: u64::from(info.vcpus_total),
                    memory_mib_total: info.memory_mib_total,
                    vcpus_used: used.vcpus,
                    memory_mib_used: used.memory_mib,
                    builds: info.builds.iter().cloned().collect::<HashSet<_>>(),
                })
            })
            .collect()
    }

    /// Record that a call to a host could not reach it.
    pub async fn mark_unreachable(&self, host_id: &str, error: &str) {
        let changed = {
            let mut hosts = self.write();
            match hosts.get_mut(host_id) {
                Some(e) => {
                    let was = e.healthy;
                    e.healthy = false;
                    e.failures = e.failures.saturating_add(1);
                    e.next_probe = Instant::now() + backoff(e.failures);
                    e.unreachable_since.get_or_insert_with(Instant::now);
                    was
                }
                None => false,
            }
        };
        if changed {
            tracing::warn!(host = %host_id, error, "host unreachable; marked unhealthy");
        }
        if let Err(err) = self
            .store
            .set_host_health(host_id, false, Some(error), None)
            .await
        {
            tracing::warn!(host = %host_id, error = %err, "recording host health failed");
        }
    }

    /// Record a successful contact with a host.
    pub async fn mark_reachable(&self, host_id: &str) {
        let changed = {
            let mut hosts = self.write();
            match hosts.get_mut(host_id) {
                Some(e) => {
                    let was = e.healthy;
                    if e.unreachable_since.take().is_some() {
                        // Back from an outage (maybe a restarted agent): its
                        // capacity and builds are news; probe it now.
                        e.next_probe = Instant::now();
                    }
                    e.healthy = e.info.is_some();
                    e.failures = 0;
                    !was && e.healthy
                }
                None => false,
            }
        };
        if changed {
            tracing::info!(host = %host_id, "host reachable again");
        }
    }

    /// Ask every host whose probe is due for its `HostInfo`; update health,
    /// capacity and backoff.
    pub async fn probe_due(&self) {
        let due: Vec<(String, HostClient, String)> = {
            let now = Instant::now();
            self.read()
                .iter()
                .filter(|(_, e)| e.next_probe <= now)
                .map(|(id, e)| (id.clone(), e.client.clone(), e.address.clone()))
                .collect()
        };
        let probes = due.into_iter().map(|(id, mut client, address)| async move {
            let mut req = tonic::Request::new(HostInfoRequest {});
            req.set_timeout(INFO_TIMEOUT);
            let result = client.host_info(req).await;
            (id, address, result)
        });
        for (id, address, result) in futures::future::join_all(probes).await {
            match result {
                Ok(reply) => {
                    let info = reply.into_inner();
                    if info.host_id != id {
                        let msg = format!("the agent at {address} now says it is {}", info.host_id);
                        self.mark_unreachable(&id, &msg).await;
                        continue;
                    }
                    let now = now_ms();
                    let row = Host {
                        id: id.clone(),
                        address,
                        backend: info.backend.clone(),
                        version: info.version.clone(),
                        vcpus_total: info.vcpus_total,
                        memory_mib_total: info.memory_mib_total,
                        healthy: true,
                        last_error: None,
                        registered_at: now,
                        last_seen_at: Some(now),
                    };
                    if let Err(err) = self.store.upsert_host(&row).await {
                        tracing::warn!(host = %id, error = %err, "recording host info failed");
                    }
                    if let Some(e) = self.write().get_mut(&id) {
                        e.info = Some(info);
                        e.healthy = true;
                        e.failures = 0;
                        e.next_probe = Instant::now() + backoff(0);
                        e.unreachable_since = None;
                    }
                }
                Err(status) => self.mark_unreachable(&id, &status_reason(&status)).await,
            }
        }
    }
}

/// Probe hosts (and pick up newly registered ones) until `shutdown` fires.
pub async fn run_probes(
    registry: Arc<HostRegistry>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = registry.load().await {
            tracing::warn!(error = %err, "loading hosts failed");
        }
        registry.probe_due().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(10), Duration::from_secs(60));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn unreachable_is_about_transport_not_answers() {
        assert!(is_unreachable(&tonic::Status::unavailable(
            "connection refused"
        )));
        assert!(is_unreachable(&tonic::Status::deadline_exceeded("timeout")));
        assert!(!is_unreachable(&tonic::Status::not_found("no sandbox")));
        assert!(!is_unreachable(&tonic::Status::internal("VMM died")));
        // The agent answered: its guest is unreachable, not the host.
        let mut guest = tonic::Status::unavailable("guest agent does not answer");
        guest
            .metadata_mut()
            .insert(AGENT_ERROR_CODE, "guest_unreachable".parse().unwrap());
        assert!(!is_unreachable(&guest));
    }

    #[test]
    fn bearer_tokens_must_be_header_safe() {
        assert!(BearerToken::new("emberjoin_abc").is_some());
        assert!(BearerToken::new("bad\ntoken").is_none());
    }
}

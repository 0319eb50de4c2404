//! The registry of host agents: for each, a gRPC client (dialled with the
//! cluster join token in `authorization` metadata), its last `HostInfo`, its
//! health, and a backoff for probing it while it is down.
//!
//! Hosts are durable rows in the store; this registry is each replica's live
//! view of them. [`HostRegistry::register_address`] is how a host joins (the
//! internal registration endpoint calls it); [`HostRegistry::register_client`]
//! is the seam for a host agent reached through a client the caller built
//! (the embedded agent of `ember server`). Not here: placement
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
use crate::model::{Host, HostUsage, now_ms};
use crate::scheduler::HostSnapshot;
use crate::store::Store;

/// Adds `authorization: Bearer <join token>` to every call.
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
    token: BearerToken,
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
    /// A registry whose clients authenticate with `join_token`.
    pub fn new(store: Store, join_token: &str) -> Result<Arc<HostRegistry>> {
        let token = BearerToken::new(join_token).ok_or_else(|| Error::HostReply {
            host: "-".into(),
            call: "configure",
            detail: "the join token is not valid in an HTTP header".into(),
        })?;
        Ok(Arc::new(HostRegistry {
            store,
            token,
            hosts: RwLock::new(HashMap::new()),
        }))
    }

    /// A lazily connecting client for `address`.
    pub fn dial(&self, address: &str) -> Result<HostClient> {
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| Error::HostReply {
                host: address.to_owned(),
                call: "dial",
                detail: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if endpoint.uri().scheme().is_none() {
            return Err(Error::HostReply {
                host: address.to_owned(),
                call: "dial",
                detail: "the address needs a scheme: http://HOST:PORT".into(),
            });
        }
        let channel = endpoint.connect_lazy();
        Ok(HostAgentClient::with_interceptor(
            channel,
            self.token.clone(),
        ))
    }

    /// Register (or re-register) the host agent listening at `address`:
    /// dial it, ask `HostInfo`, record it. The host's own ID comes from its reply.
    pub async fn register_address(&self, address: &str) -> Result<Host> {
        let client = self.dial(address)?;
        self.register_client(address.to_owned(), client).await
    }

    /// The seam for a host agent reached through a client built elsewhere
    /// (e.g. `ember server`'s embedded agent): ask it `HostInfo`, record it,
    /// and use `client` for every later call. `address` is what `GET /v1/hosts` shows.
    pub async fn register_client(&self, address: String, mut client: HostClient) -> Result<Host> {
        let mut req = tonic::Request::new(HostInfoRequest {});
        req.set_timeout(INFO_TIMEOUT);
        let info = client
            .host_info(req)
            .await
            .map_err(|s| Error::HostCall {
                host: address.clone(),
                call: "HostInfo",
                source: Box::new(s),
            })?
            .into_inner();
        if info.host_id.is_empty() {
            return Err(Error::HostReply {
                host: address,
                call: "HostInfo",
                detail: "empty host_id".into(),
            });
        }
        let now = now_ms();
        let previous = self.store.host(&info.host_id).await?;
        if let Some(p) = previous.as_ref().filter(|p| p.address != address) {
            self.refuse_a_live_twin(&info.host_id, &p.address).await?;
        }
        let host = Host {
            id: info.host_id.clone(),
            address: address.clone(),
            backend: info.backend.clone(),
            version: info.version.clone(),
            vcpus_total: info.vcpus_total,
            memory_mib_total: info.memory_mib_total,
            healthy: true,
            last_error: None,
            registered_at: previous.map_or(now, |p| p.registered_at),
            last_seen_at: Some(now),
        };
        self.store.upsert_host(&host).await?;
        let entry = Entry {
            address,
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

    /// A host ID moves to a new address only when the agent at the old one
    /// no longer answers as that host (it was restarted elsewhere, or its
    /// machine is gone). A live agent keeps its ID: whoever else holds the
    /// join token cannot register under it and receive its sandboxes'
    /// traffic.
    async fn refuse_a_live_twin(&self, host_id: &str, registered: &str) -> Result<()> {
        let client = self
            .read()
            .get(host_id)
            .map(|e| e.client.clone())
            .map_or_else(|| self.dial(registered), Ok);
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

    /// Pick up hosts registered through other replicas (or before a restart).
    pub async fn load(&self) -> Result<()> {
        let rows = self.store.list_hosts().await?;
        let mut fresh = Vec::new();
        {
            let known = self.read();
            for row in rows {
                let changed = known.get(&row.id).is_none_or(|e| e.address != row.address);
                if changed {
                    fresh.push(row);
                }
            }
        }
        for row in fresh {
            match self.dial(&row.address) {
                Ok(client) => {
                    let entry = Entry {
                        address: row.address.clone(),
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

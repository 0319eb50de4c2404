//! A typed client for Firecracker's HTTP/1.1 API on its Unix socket.
//!
//! One request at a time (Firecracker serves one anyway, and a snapshot must
//! not race a resume), a fresh connection per call (a dead VMM shows up at
//! `connect`, never as a half-open keep-alive connection), and a deadline on
//! every call. Failures stay distinguishable, each naming the call
//! (`PUT /drives/root`):
//!
//! - Firecracker said no (`{"fault_message": ...}`) → [`VmmError::Refused`]
//! - nothing listens, or the connection broke → [`VmmError::Connection`]
//! - no answer in time → [`VmmError::Timeout`]
//! - an answer that is not HTTP, or not the JSON expected → [`VmmError::Protocol`]
//!
//! The client knows the API, not the VM: the driver decides what to call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::models::*;
use crate::{Result, VmmError};

/// Deadlines for API calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiTimeouts {
    /// Configuration, pause, resume, queries.
    pub call: Duration,
    /// `PUT /snapshot/create` and `/snapshot/load`, which move guest memory.
    pub snapshot: Duration,
}

impl Default for ApiTimeouts {
    fn default() -> Self {
        Self {
            call: Duration::from_secs(10),
            snapshot: Duration::from_secs(300),
        }
    }
}

/// A client for one Firecracker process's API socket.
#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeouts: ApiTimeouts,
    turn: tokio::sync::Mutex<()>,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>, timeouts: ApiTimeouts) -> Self {
        Self {
            socket: socket.into(),
            timeouts,
            turn: tokio::sync::Mutex::new(()),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeouts(&self) -> ApiTimeouts {
        self.timeouts
    }

    // --- Queries -----------------------------------------------------------

    /// `GET /`: the instance's ID, state and version.
    pub async fn describe_instance(&self) -> Result<InstanceInfo> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion> {
        self.get("/version").await
    }

    /// `GET /vm/config`.
    pub async fn vm_config(&self) -> Result<FullVmConfiguration> {
        self.get("/vm/config").await
    }

    /// `GET /machine-config`.
    pub async fn machine_config(&self) -> Result<MachineConfig> {
        self.get("/machine-config").await
    }

    /// `GET /balloon`.
    pub async fn balloon(&self) -> Result<Balloon> {
        self.get("/balloon").await
    }

    /// `GET /balloon/statistics`.
    pub async fn balloon_stats(&self) -> Result<BalloonStats> {
        self.get("/balloon/statistics").await
    }

    // --- Configuration (before boot) ------------------------------------

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, body: &BootSource) -> Result<()> {
        self.send(Method::PUT, "/boot-source", body, self.timeouts.call)
            .await
    }

    /// `PUT /drives/{drive_id}`.
    pub async fn put_drive(&self, body: &Drive) -> Result<()> {
        let path = format!("/drives/{}", path_id(&body.drive_id)?);
        self.send(Method::PUT, &path, body, self.timeouts.call)
            .await
    }

    /// `PATCH /drives/{drive_id}` (after boot).
    pub async fn patch_drive(&self, body: &PartialDrive) -> Result<()> {
        let path = format!("/drives/{}", path_id(&body.drive_id)?);
        self.send(Method::PATCH, &path, body, self.timeouts.call)
            .await
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub async fn put_network_interface(&self, body: &NetworkInterface) -> Result<()> {
        let path = format!("/network-interfaces/{}", path_id(&body.iface_id)?);
        self.send(Method::PUT, &path, body, self.timeouts.call)
            .await
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, body: &MachineConfig) -> Result<()> {
        self.send(Method::PUT, "/machine-config", body, self.timeouts.call)
            .await
    }

    /// `PATCH /machine-config`.
    pub async fn patch_machine_config(&self, body: &MachineConfigUpdate) -> Result<()> {
        self.send(Method::PATCH, "/machine-config", body, self.timeouts.call)
            .await
    }

    /// `PUT /vsock`.
    pub async fn put_vsock(&self, body: &Vsock) -> Result<()> {
        self.send(Method::PUT, "/vsock", body, self.timeouts.call)
            .await
    }

    /// `PUT /balloon`.
    pub async fn put_balloon(&self, body: &Balloon) -> Result<()> {
        self.send(Method::PUT, "/balloon", body, self.timeouts.call)
            .await
    }

    /// `PATCH /balloon`.
    pub async fn patch_balloon(&self, body: &BalloonUpdate) -> Result<()> {
        self.send(Method::PATCH, "/balloon", body, self.timeouts.call)
            .await
    }

    /// `PATCH /balloon/statistics`.
    pub async fn patch_balloon_stats(&self, body: &BalloonStatsUpdate) -> Result<()> {
        self.send(
            Method::PATCH,
            "/balloon/statistics",
            body,
            self.timeouts.call,
        )
        .await
    }

    /// `PUT /entropy`.
    pub async fn put_entropy(&self, body: &EntropyDevice) -> Result<()> {
        self.send(Method::PUT, "/entropy", body, self.timeouts.call)
            .await
    }

    /// `PUT /logger`.
    pub async fn put_logger(&self, body: &Logger) -> Result<()> {
        self.send(Method::PUT, "/logger", body, self.timeouts.call)
            .await
    }

    /// `PUT /metrics`.
    pub async fn put_metrics(&self, body: &Metrics) -> Result<()> {
        self.send(Method::PUT, "/metrics", body, self.timeouts.call)
            .await
    }

    /// `PUT /serial`.
    pub async fn put_serial(&self, body: &SerialDevice) -> Result<()> {
        self.send(Method::PUT, "/serial", body, self.timeouts.call)
            .await
    }

    // --- Lifecycle -------------------------------------------------------

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<()> {
        let body = InstanceActionInfo { action_type };
        self.send(Method::PUT, "/actions", &body, self.timeouts.call)
            .await
    }

    /// `PATCH /vm`: pause or resume the vCPUs.
    pub async fn patch_vm(&self, state: VmState) -> Result<()> {
        let body = VmStateUpdate { state };
        self.send(Method::PATCH, "/vm", &body, self.timeouts.call)
            .await
    }

    /// `PUT /snapshot/create`.
    pub async fn create_snapshot(&self, body: &SnapshotCreateParams) -> Result<()> {
        self.send(
            Method::PUT,
            "/snapshot/create",
            body,
            self.timeouts.snapshot,
        )
        .await
    }

    /// `PUT /snapshot/load`.
    pub async fn load_snapshot(&self, body: &SnapshotLoadParams) -> Result<()> {
        self.send(Method::PUT, "/snapshot/load", body, self.timeouts.snapshot)
            .await
    }

    // --- Transport -------------------------------------------------------

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let call = format!("GET {path}");
        let (status, body) = self
            .exchange(&call, Method::GET, path, None, self.timeouts.call)
            .await?;
        if status != StatusCode::OK {
            return Err(VmmError::Protocol {
                call,
                detail: format!("expected 200 OK, got {status}"),
            });
        }
        serde_json::from_slice(&body).map_err(|e| VmmError::Protocol {
            call,
            detail: format!("{e} in {}", snippet(&body)),
        })
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<()> {
        let call = format!("{method} {path}");
        let json = serde_json::to_vec(body).map_err(|e| VmmError::Config(e.to_string()))?;
        self.exchange(&call, method, path, Some(json), timeout)
            .await?;
        Ok(())
    }

    /// One request on a fresh connection. Returns only 2xx answers; errors
    /// are classified as the module comment says.
    async fn exchange(
        &self,
        call: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes)> {
        let _turn = self.turn.lock().await;
        tracing::debug!(socket = %self.socket.display(), call, "firecracker api call");
        let attempt = self.round_trip(call, method, path, body);
        let (status, body) =
            tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| VmmError::Timeout {
                    call: call.to_owned(),
                    after: timeout,
                })??;
        if status.is_success() {
            return Ok((status, body));
        }
        match serde_json::from_slice::<ApiError>(&body) {
            Ok(err) => Err(VmmError::Refused {
                call: call.to_owned(),
                message: err.fault_message,
            }),
            Err(_) => Err(VmmError::Protocol {
                call: call.to_owned(),
                detail: format!("{status} without a fault message: {}", snippet(&body)),
            }),
        }
    }

    async fn round_trip(
        &self,
        call: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes)> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| VmmError::Connection {
                    call: call.to_owned(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| classify(call, e))?;
        // The connection future does the actual I/O; it lives exactly as long
        // as this call.
        let driver = AbortOnDrop(tokio::spawn(connection));

        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| VmmError::Config(format!("cannot build {call}: {e}")))?;

        let response = sender
            .send_request(request)
            .await
            .map_err(|e| classify(call, e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| classify(call, e))?
            .to_bytes();
        drop(driver);
        Ok((status, body))
    }
}

/// Parse errors mean the peer is not speaking HTTP (or not well); anything
/// else means the connection itself failed.
fn classify(call: &str, e: hyper::Error) -> VmmError {
    if e.is_parse() || e.is_parse_status() {
        VmmError::Protocol {
            call: call.to_owned(),
            detail: e.to_string(),
        }
    } else {
        VmmError::Connection {
            call: call.to_owned(),
            source: std::io::Error::other(e),
        }
    }
}

/// IDs become path segments: keep them to what Firecracker accepts so an ID
/// can never change which endpoint is called.
fn path_id(id: &str) -> Result<&str> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(VmmError::Config(format!(
            "device ID {id:?} must be 1 to 64 letters, digits or underscores"
        )))
    }
}

fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    if body.len() > MAX {
        format!("{text:?}…")
    } else {
        format!("{text:?}")
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_smuggle_paths() {
        assert!(path_id("root").is_ok());
        assert!(path_id("data_1").is_ok());
        for bad in ["", "../vm", "a/b", "a b", "x?y=1", &"a".repeat(65)] {
            assert!(path_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}

//! `ember sandbox url|ingress|port-forward`: reach what listens inside a
//! sandbox through the server's ingress proxy and tunnels.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;

use anyhow::Context;
use ember_control::wire::{IngressUpdate, Link, LinkRequest, Sandbox};
use reqwest::Method;
use reqwest::header::{CONNECTION, UPGRADE};

use super::api::{Api, error_from, typed};
use super::output::print_json;
use super::sandbox::sandbox_path;

/// The upgrade protocol of the server's tunnel endpoint.
const TCP_UPGRADE: &str = "ember-tcp";

#[derive(Debug, clap::Args)]
pub struct UrlArgs {
    id: String,
    /// TCP port in the sandbox.
    port: u16,
    /// A one-time link for a browser instead (it sets a cookie for the
    /// port's host name and needs the server's --ingress-domain).
    #[arg(long)]
    link: bool,
    /// With --link: the page to open.
    #[arg(long, default_value = "/")]
    path: String,
}

#[derive(Debug, clap::Args)]
pub struct IngressArgs {
    id: String,
    /// Whether its ports are reachable without its traffic token.
    #[arg(long, value_name = "true|false")]
    public: Option<bool>,
    /// Whether a request to a port wakes it while it is paused.
    #[arg(long, value_name = "true|false")]
    auto_resume: Option<bool>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    id: String,
    /// `REMOTE` (the same port here) or `LOCAL:REMOTE`; LOCAL 0 picks a free port.
    ports: String,
    /// Local address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    address: IpAddr,
}

/// `[LOCAL:]REMOTE`.
fn parse_ports(spec: &str) -> anyhow::Result<(u16, u16)> {
    let bad =
        || anyhow::anyhow!("{spec:?}: give REMOTE or LOCAL:REMOTE, ports 1-65535 (LOCAL may be 0)");
    let (local, remote) = match spec.split_once(':') {
        Some((l, r)) => (l.parse::<u16>().map_err(|_| bad())?, r),
        None => (u16::MAX, spec),
    };
    let remote = remote
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let local = if local == u16::MAX && !spec.contains(':') {
        remote
    } else {
        local
    };
    Ok((local, remote))
}

pub async fn url(api: &Api, a: UrlArgs) -> anyhow::Result<ExitCode> {
    if a.link {
        let v = api
            .post(
                &format!("{}/links", sandbox_path(&a.id)),
                &LinkRequest {
                    port: a.port,
                    path: Some(a.path),
                },
            )
            .await?;
        let link: Link = typed("the link", &v)?;
        println!("{}", link.url);
        return Ok(ExitCode::SUCCESS);
    }
    let v = api.get(&sandbox_path(&a.id)).await?;
    let sb: Sandbox = typed("the sandbox", &v)?;
    let url = sb.port_url.replace("{port}", &a.port.to_string());
    let url = if url.starts_with('/') {
        format!("{}{url}", api.base().trim_end_matches('/'))
    } else {
        url
    };
    println!("{url}");
    if !sb.public && std::io::stderr().is_terminal() {
        eprintln!(
            "(private: send the header `X-Ember-Traffic-Token: {}`, or open \
             `ember sandbox url {} {} --link` in a browser)",
            sb.traffic_token, sb.id, a.port
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn ingress(api: &Api, a: IngressArgs) -> anyhow::Result<ExitCode> {
    let v = if a.public.is_none() && a.auto_resume.is_none() {
        api.get(&sandbox_path(&a.id)).await?
    } else {
        api.put(
            &format!("{}/ingress", sandbox_path(&a.id)),
            &IngressUpdate {
                public: a.public,
                auto_resume: a.auto_resume,
            },
        )
        .await?
    };
    if a.json {
        print_json(&v);
    } else {
        let sb: Sandbox = typed("the sandbox", &v)?;
        println!(
            "{}: ports {}, {}",
            sb.id,
            if sb.public { "public" } else { "private" },
            if sb.auto_resume {
                "traffic wakes it when paused"
            } else {
                "traffic does not wake it"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn port_forward(api: &Api, a: ForwardArgs) -> anyhow::Result<ExitCode> {
    let (local, remote) = parse_ports(&a.ports)?;
    // Fail early, and clearly, on an unknown sandbox or a wrong key.
    api.get(&sandbox_path(&a.id)).await?;
    let listener = tokio::net::TcpListener::bind((a.address, local))
        .await
        .with_context(|| format!("listening on {}:{local}", a.address))?;
    let bound = listener.local_addr()?;
    println!("forwarding {bound} -> {}:{remote}", a.id);
    std::io::stdout().flush()?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            accepted = listener.accept() => {
                let (stream, peer) = accepted.context("accepting a connection")?;
                let api = api.clone();
                let id = a.id.clone();
                tokio::spawn(async move {
                    if let Err(e) = forward(&api, &id, remote, stream).await {
                        eprintln!("ember sandbox port-forward: connection from {peer}: {e:#}");
                    }
                });
            }
        }
    }
}

/// One local connection, spliced to the port through the server.
async fn forward(
    api: &Api,
    id: &str,
    port: u16,
    mut stream: tokio::net::TcpStream,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let resp = api
        .request(Method::GET, &format!("{}/tunnel/{port}", sandbox_path(id)))
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, TCP_UPGRADE)
        .send()
        .await
        .context("reaching the server")?;
    if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Err(error_from(resp).await.into());
    }
    let mut upgraded = resp.upgrade().await.context("switching to the tunnel")?;
    tokio::io::copy_bidirectional(&mut stream, &mut upgraded).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse() {
        assert_eq!(parse_ports("5432").unwrap(), (5432, 5432));
        assert_eq!(parse_ports("15432:5432").unwrap(), (15432, 5432));
        assert_eq!(parse_ports("0:80").unwrap(), (0, 80));
        for bad in ["", "x", "80:", ":0", "1:0", "70000", "1:2:3"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }
}

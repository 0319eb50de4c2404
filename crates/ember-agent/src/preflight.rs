//! What a host agent needs from its machine, checked once at start so a
//! missing tool is one clear error naming every package to install, not a
//! failure at the first sandbox.
//!
//! Not here: the image build's own tools (`ember-image` checks those when
//! it builds), and anything a test alone needs (`scripts/setup-host`).

use std::path::Path;

use ember_image::host::{QEMU_IMG, Tool, find_program};
use ember_types::BackendKind;

use crate::error::AgentError;

const IP: Tool = Tool {
    name: "ip",
    package: "iproute2",
};
const NFT: Tool = Tool {
    name: "nft",
    package: "nftables",
};

/// What this host lacks, one line each; empty when nothing is missing.
/// `vmm_binary` is the backend's own binary, a path or a name looked up
/// like any tool.
pub fn missing(backend: BackendKind, vmm_binary: Option<&Path>) -> Vec<String> {
    let mut tools = vec![IP, NFT];
    if backend == BackendKind::Qemu {
        tools.push(QEMU_IMG);
    }
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| t.path().is_err())
        .map(|t| format!("{} (apt-get install {})", t.name, t.package))
        .collect();
    if let Some(bin) = vmm_binary
        && find_program(bin).is_none()
    {
        missing.push(match backend {
            BackendKind::Qemu => {
                format!("{} (apt-get install qemu-system-x86)", bin.display())
            }
            BackendKind::Firecracker => format!(
                "{} (build Firecracker and pass --firecracker-bin)",
                bin.display()
            ),
        });
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun (modprobe tun)".to_owned());
    }
    missing
}

/// [`missing`] as an error.
pub fn check(backend: BackendKind, vmm_binary: Option<&Path>) -> Result<(), AgentError> {
    let missing = missing(backend, vmm_binary);
    if missing.is_empty() {
        return Ok(());
    }
    Err(AgentError::HostTools { missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_is_named_with_what_to_do() {
        let m = missing(BackendKind::Qemu, Some(Path::new("/nonexistent/qemu")));
        assert!(
            m.iter()
                .any(|l| l == "/nonexistent/qemu (apt-get install qemu-system-x86)"),
            "{m:?}"
        );
        let m = missing(BackendKind::Firecracker, Some(Path::new("/nonexistent/fc")));
        assert!(m.iter().any(|l| l.contains("--firecracker-bin")), "{m:?}");
        let err = AgentError::HostTools {
            missing: vec!["nft (apt-get install nftables)".into()],
        };
        let text = err.to_string();
        assert!(text.contains("nft (apt-get install nftables)"), "{text}");
        assert!(text.contains("scripts/setup-host"), "{text}");
    }
}

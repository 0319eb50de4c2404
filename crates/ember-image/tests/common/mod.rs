//! Helpers shared by the image tests that build real images.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_image::{Error, Image, ImageSpec, Progress};

/// Tools a real build needs, with the package that provides each.
const BUILD_TOOLS: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("apt-get", "apt"),
    ("dpkg-deb", "dpkg"),
    ("depmod", "kmod"),
];

pub fn find_tool(name: &str) -> Option<PathBuf> {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join(name))
    .find(|p| p.is_file())
}

/// Why a real build cannot run here, if it cannot.
pub fn build_precondition() -> Option<String> {
    if !ember_testkit::is_root() {
        return Some("needs root (debootstrap, chroot)".into());
    }
    for (tool, package) in BUILD_TOOLS {
        if find_tool(tool).is_none() {
            return Some(format!("{tool} not found: apt-get install {package}"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("no busybox: apt-get install busybox-static".into());
    }
    None
}

/// A stand-in for ember-guest: a shell script that prints `marker` with
/// what it sees (its PID, /dev, the environment variable and arguments the
/// kernel command line handed down), runs python3, and powers the VM off.
pub fn stand_in_guest(dir: &Path, name: &str, marker: &str) -> PathBuf {
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\n\
         dev=$([ -b /dev/vda ] && echo ok)\n\
         echo \"{marker} pid=$$ user=$(id -un) dev=$dev env=$EMBER_SMOKE_ENV args=$* clock=$clock\"\n\
         python3 -c 'import sys; print(\"{marker} python\", sys.version_info[0] * 14)'\n\
         sync\n\
         echo o > /proc/sysrq-trigger\n\
         sleep 10\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `Image::ensure`, recording progress. `None` (after reporting a skip)
/// when the Debian mirror is unreachable from this machine.
pub fn ensure(
    data: &Path,
    spec: &ImageSpec,
) -> Option<(Image, Vec<Progress>, std::time::Duration)> {
    let mut events = Vec::new();
    let start = std::time::Instant::now();
    match Image::ensure(data, spec, &mut |p| {
        eprintln!("progress: {p:?}");
        events.push(p);
    }) {
        Ok(image) => Some((image, events, start.elapsed())),
        Err(err @ Error::MirrorUnreachable { .. }) => {
            ember_testkit::report_skip(
                module_path!(),
                &format!("needs network access to the Debian mirror: {err}"),
            );
            None
        }
        Err(err) => panic!("ensure failed: {err}"),
    }
}

/// Whether `step` ran (false) or came from the cache (true).
pub fn cached(events: &[Progress], step: ember_image::Step) -> bool {
    events
        .iter()
        .find_map(|e| match e {
            Progress::Finished {
                step: s, cached, ..
            } if *s == step => Some(*cached),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Finished event for {step:?}"))
}

/// Run a debugfs request against an ext4 image (read-only, no mount).
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new(find_tool("debugfs").unwrap())
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A file's contents from inside an ext4 image.
pub fn ext4_read(image: &Path, path: &str, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("dumped");
    let _ = std::fs::remove_file(&out);
    debugfs(image, &format!("dump {path} {}", out.display()));
    std::fs::read(&out).unwrap_or_else(|e| panic!("{path} not in {}: {e}", image.display()))
}

/// Bytes the file really occupies on disk.
pub fn on_disk(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

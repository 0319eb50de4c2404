//! Boots a built image end to end under QEMU TCG (`-M microvm`): kernel,
//! initramfs (modules, root disk), and the root filesystem's /sbin/init.
//! A stand-in init prints a marker, runs python3 and powers off. Needs
//! what an image build needs plus qemu-system-x86 and qemu-utils.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ember_image::{DEFAULT_KERNEL_ARGS, ImageSpec, cow};

const MARKER: &str = "EMBER-SMOKE";
const DEADLINE: Duration = Duration::from_secs(240);

/// Kills QEMU if the test ends before it does.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host TSC frequency in kHz: microvm has no HPET to calibrate against.
fn tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .expect("cpu MHz in /proc/cpuinfo");
    (mhz * 1000.0) as u64
}

/// Shared across runs so only the first one pays for debootstrap.
fn data_dir() -> PathBuf {
    std::env::var_os("EMBER_TEST_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ember_testkit::workspace_root().join("target/ember-image-test-data"))
}

#[test]
fn image_boots_to_its_init_under_qemu_tcg_root_network() {
    if let Some(reason) = build_precondition() {
        ember_testkit::report_skip(module_path!(), &reason);
        return;
    }
    let qemu = find_tool("qemu-system-x86_64");
    ember_testkit::require!(
        qemu.is_some(),
        "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
    );
    ember_testkit::require!(
        find_tool("qemu-img").is_some(),
        "qemu-img not found: apt-get install qemu-utils"
    );

    let scratch = tempfile::tempdir().unwrap();
    let guest = stand_in_guest(scratch.path(), "smoke-init", MARKER);
    let Some((image, _, _)) = ensure(&data_dir(), &ImageSpec::new(&guest)) else {
        return;
    };

    let overlay = scratch.path().join("root.qcow2");
    let size = std::fs::metadata(&image.rootfs).unwrap().len();
    cow::qcow2_overlay(&image.rootfs, cow::DiskFormat::Raw, size, &overlay).unwrap();
    let serial = scratch.path().join("serial.log");
    // Unknown `key=value` words reach init's environment, bare words its argv.
    let append = format!(
        "{DEFAULT_KERNEL_ARGS} tsc_early_khz={} EMBER_SMOKE_ENV=hello smokearg",
        tsc_khz()
    );
    let start = Instant::now();
    let mut vm = Vm(Command::new(qemu.unwrap())
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64,+arat",
            "-m",
            "512",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&image.vmlinux)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &append])
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=qcow2,if=none",
            overlay.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());

    let log = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let python_line = format!("{MARKER} python 42");
    let mut to_marker = None;
    let mut to_python = None;
    let mut exited = None;
    while start.elapsed() < DEADLINE {
        let text = log(&serial);
        if to_marker.is_none() && text.contains(&format!("{MARKER} pid=")) {
            to_marker = Some(start.elapsed());
        }
        if to_python.is_none() && text.contains(&python_line) {
            to_python = Some(start.elapsed());
        }
        if let Some(status) = vm.0.try_wait().unwrap() {
            exited = Some((status, start.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = log(&serial);
    let tail: String = text
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        to_marker.is_some(),
        "no marker within {DEADLINE:?}; serial log:\n{tail}"
    );
    assert!(text.contains("ember-initramfs: loading modules"), "{tail}");
    assert!(
        text.contains("ember-initramfs: starting /sbin/init from /dev/vda"),
        "{tail}"
    );
    assert!(!text.contains("ERROR: required module"), "{tail}");
    assert!(
        text.contains(&format!("{MARKER} pid=1 user=root")),
        "init runs as PID 1: {tail}"
    );
    assert!(to_python.is_some(), "python3 ran in the guest: {tail}");
    let (status, to_exit) =
        exited.unwrap_or_else(|| panic!("the guest did not power off; serial log:\n{tail}"));
    assert!(status.success(), "qemu exited with {status}");

    // The guest mounted its root read-write: the overlay, not the base, took the writes.
    let written = cow::written_blocks(&overlay, None).unwrap();
    assert!(
        !written.is_empty(),
        "booting wrote to the root disk's overlay"
    );
    let written_bytes: u64 = written.iter().map(|r| r.end - r.start).sum();

    eprintln!(
        "MEASURE boot to init marker {:.2}s, to python output {:.2}s, to power-off {:.2}s; overlay holds {} ranges, {} KiB written",
        to_marker.unwrap().as_secs_f64(),
        to_python.unwrap().as_secs_f64(),
        to_exit.as_secs_f64(),
        written.len(),
        written_bytes >> 10,
    );
    for line in text
        .lines()
        .filter(|l| l.contains("ember-initramfs") || l.contains(MARKER))
    {
        eprintln!("serial: {line}");
    }
}

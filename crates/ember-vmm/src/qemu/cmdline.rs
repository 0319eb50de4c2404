//! The QEMU command line of one VM, as a pure function of a [`LaunchPlan`].
//!
//! Boot and restore build the same machine; a restore only adds
//! `-incoming defer -S`. Everything that must match between a snapshot and
//! its restore (machine options, device order, RAM backend id) is decided
//! here and nowhere else.
//!
//! This module does no I/O: paths are taken as given (the launcher resolved
//! them) and validation of user input happens before a plan is built.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::accel::Accel;
use crate::{MachineSpec, Result, VmmError};

/// The id of the RAM backend object. Migration matches RAM blocks by this
/// name, so it never changes.
pub const RAM_ID: &str = "ram";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub vm_id: String,
    pub accel: Accel,
    /// Appended as `tsc_early_khz=` under TCG.
    pub tsc_khz: Option<u32>,
    pub machine: MachineSpec,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_args: String,
    pub memory_file: PathBuf,
    /// `share=on`: guest writes land in `memory_file`. `share=off`: the file
    /// is mapped copy-on-write and never written.
    pub memory_shared: bool,
    pub drives: Vec<PlannedDrive>,
    pub net: Option<PlannedNet>,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    /// Wait for `migrate-incoming` instead of booting, vCPUs stopped.
    pub incoming: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDrive {
    pub id: String,
    /// The stable path the VM sees (see `drives`), not the real disk.
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
    /// The files under a qcow2 drive, top first.
    pub backing: Vec<PlannedBacking>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBacking {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// QEMU's own seccomp filter: no obsolete system calls, no set*id, no
/// fork/exec, no scheduler or resource changes. Every Ember QEMU runs
/// under it, confined or not.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

pub use ember_types::DiskFormat;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNet {
    pub tap: String,
    pub mac: String,
}

/// The arguments after the binary name.
pub fn qemu_args(plan: &LaunchPlan) -> Vec<OsString> {
    let mut args = Args::default();
    // Lets `adopt` recognise this VM's process from its command line.
    args.push("-name").push(format!("guest={}", plan.vm_id));
    args.push("-machine")
        .push(format!("microvm,acpi=on,rtc=on,memory-backend={RAM_ID}"));
    args.push("-nodefaults")
        .push("-no-user-config")
        .push("-nographic")
        .push("-no-reboot")
        .push("-msg")
        .push("timestamp=on");
    match plan.accel {
        Accel::Kvm => args.push("-accel").push("kvm").push("-cpu").push("host"),
        // +arat: the guest idles in a halt loop instead of polling the timer.
        Accel::Tcg => args
            .push("-accel")
            .push("tcg")
            .push("-cpu")
            .push("qemu64,+arat"),
    };
    args.push("-m")
        .push(format!("{}M", plan.machine.memory_mib))
        .push("-smp")
        .push(plan.machine.vcpus.to_string());
    args.push("-object").push(option(&[
        ("memory-backend-file", None),
        ("id", Some(RAM_ID.as_ref())),
        (
            "size",
            Some(format!("{}M", plan.machine.memory_mib).as_ref()),
        ),
        ("mem-path", Some(plan.memory_file.as_os_str())),
        (
            "share",
            Some(if plan.memory_shared { "on" } else { "off" }.as_ref()),
        ),
    ]));

    args.push("-kernel").push(plan.kernel.as_os_str());
    if let Some(initrd) = &plan.initrd {
        args.push("-initrd").push(initrd.as_os_str());
    }
    args.push("-append").push(kernel_cmdline(plan));

    args.push("-chardev").push(option(&[
        ("file", None),
        ("id", Some("serial".as_ref())),
        ("path", Some(plan.serial_log.as_os_str())),
        // A restore into the same run directory keeps the earlier console.
        ("append", Some("on".as_ref())),
    ]));
    args.push("-serial").push("chardev:serial");
    args.push("-chardev").push(option(&[
        ("socket", None),
        ("id", Some("qmp".as_ref())),
        ("path", Some(plan.qmp_socket.as_os_str())),
        ("server", Some("on".as_ref())),
        ("wait", Some("off".as_ref())),
    ]));
    args.push("-mon").push("chardev=qmp,mode=control");

    for drive in &plan.drives {
        let node = format!("drive_{}", drive.id);
        args.push("-blockdev")
            .push(blockdev(drive, &node).to_string());
        args.push("-device")
            .push(format!("virtio-blk-device,drive={node}"));
    }
    if let Some(net) = &plan.net {
        args.push("-netdev").push(format!(
            "tap,id=net0,ifname={},script=no,downscript=no",
            net.tap
        ));
        args.push("-device")
            .push(format!("virtio-net-device,netdev=net0,mac={}", net.mac));
    }
    args.push("-sandbox").push(SANDBOX);
    if plan.incoming {
        args.push("-incoming").push("defer").push("-S");
    }
    args.0
}

/// A drive as a `-blockdev` node graph: the drive's own file in its stated
/// format, and under a qcow2 drive each backing file explicitly, read-only,
/// in its stated format; the last qcow2 layer says it has no backing, so
/// QEMU never opens a file a header names.
fn blockdev(drive: &PlannedDrive, node: &str) -> serde_json::Value {
    use serde_json::json;
    let file = |path: &Path| json!({"driver": "file", "filename": path.to_string_lossy()});
    // Built bottom-up: each layer holds the one below.
    let mut below = serde_json::Value::Null;
    for layer in drive.backing.iter().rev() {
        let mut node = json!({
            "driver": layer.format.as_str(),
            "read-only": true,
            "file": file(&layer.path),
        });
        if layer.format == DiskFormat::Qcow2 {
            node["backing"] = below;
        }
        below = node;
    }
    let mut top = json!({
        "driver": drive.format.as_str(),
        "node-name": node,
        "read-only": drive.read_only,
        "file": file(&drive.path),
    });
    if drive.format == DiskFormat::Qcow2 {
        top["backing"] = below;
    }
    top
}

fn kernel_cmdline(plan: &LaunchPlan) -> String {
    let mut cmdline = plan.kernel_args.trim().to_owned();
    if plan.accel == Accel::Tcg
        && let Some(khz) = plan.tsc_khz
        && !cmdline
            .split_whitespace()
            .any(|w| w.starts_with("tsc_early_khz="))
    {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&format!("tsc_early_khz={khz}"));
    }
    cmdline
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, arg: impl Into<OsString>) -> &mut Args {
        self.0.push(arg.into());
        self
    }
}

/// A QemuOpts value: `key=value` pairs joined by commas, where a comma inside
/// a value is written twice.
fn option(pairs: &[(&str, Option<&std::ffi::OsStr>)]) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out: Vec<u8> = Vec::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(key.as_bytes());
        if let Some(value) = value {
            out.push(b'=');
            for &b in value.as_bytes() {
                out.push(b);
                if b == b',' {
                    out.push(b',');
                }
            }
        }
    }
    OsString::from_vec(out)
}

/// The value of `key` in a QemuOpts string, undoing comma doubling.
pub fn option_value(opts: &[u8], key: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut fields: Vec<Vec<u8>> = vec![Vec::new()];
    let mut i = 0;
    while i < opts.len() {
        if opts[i] == b',' {
            if opts.get(i + 1) == Some(&b',') {
                fields.last_mut().expect("never empty").push(b',');
                i += 2;
                continue;
            }
            fields.push(Vec::new());
        } else {
            fields.last_mut().expect("never empty").push(opts[i]);
        }
        i += 1;
    }
    let prefix = format!("{key}=");
    fields.into_iter().find_map(|f| {
        f.strip_prefix(prefix.as_bytes())
            .map(|v| PathBuf::from(OsString::from_vec(v.to_vec())))
    })
}

/// Options QEMU would split or misread.
pub fn validate_vm_id(vm_id: &str) -> Result<()> {
    let ok = !vm_id.is_empty()
        && vm_id.len() <= 64
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(VmmError::Config(format!(
            "VM id {vm_id:?} must be 1 to 64 characters of [A-Za-z0-9._-]"
        )))
    }
}

pub fn validate_net(tap: &str, mac: &str) -> Result<()> {
    let tap_ok = !tap.is_empty()
        && tap.len() < 16
        && tap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !tap_ok {
        return Err(VmmError::Config(format!(
            "TAP name {tap:?} must be 1 to 15 characters of [A-Za-z0-9._-]"
        )));
    }
    let octets: Vec<&str> = mac.split(':').collect();
    let mac_ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !mac_ok {
        return Err(VmmError::Config(format!(
            "guest MAC {mac:?} must look like aa:bb:cc:dd:ee:ff"
        )));
    }
    Ok(())
}

/// Unix socket paths are limited to 107 bytes; QEMU would fail with a less
/// helpful message.
pub fn validate_socket_path(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().len() > 107 {
        return Err(VmmError::Config(format!(
            "socket path {} is longer than 107 bytes: use a shorter run directory",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            vm_id: "sbx-1".into(),
            accel: Accel::Tcg,
            tsc_khz: Some(2_299_998),
            machine: MachineSpec {
                vcpus: 2,
                memory_mib: 256,
            },
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            kernel_args: "console=ttyS0 quiet".into(),
            memory_file: "/mem/ram,1".into(),
            memory_shared: true,
            drives: vec![
                PlannedDrive {
                    id: "root".into(),
                    path: "/run/vm/drives/root".into(),
                    format: DiskFormat::Qcow2,
                    read_only: false,
                    backing: vec![
                        PlannedBacking {
                            path: "/run/vm/drives/root.1".into(),
                            format: DiskFormat::Qcow2,
                        },
                        PlannedBacking {
                            path: "/run/vm/drives/root.2".into(),
                            format: DiskFormat::Raw,
                        },
                    ],
                },
                PlannedDrive {
                    id: "data".into(),
                    path: "/run/vm/drives/data".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                    backing: Vec::new(),
                },
            ],
            net: Some(PlannedNet {
                tap: "tap0".into(),
                mac: "06:00:ac:10:00:02".into(),
            }),
            qmp_socket: "/run/vm/qmp.sock".into(),
            serial_log: "/run/vm/serial.log".into(),
            incoming: false,
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    /// The value following `flag`, for flags given once.
    fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing"));
        &args[i + 1]
    }

    fn all_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_boot_command_line() {
        let args = strings(qemu_args(&plan()));
        let expected: Vec<String> = [
            "-name",
            "guest=sbx-1",
            "-machine",
            "microvm,acpi=on,rtc=on,memory-backend=ram",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-msg",
            "timestamp=on",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64,+arat",
            "-m",
            "256M",
            "-smp",
            "2",
            "-object",
            "memory-backend-file,id=ram,size=256M,mem-path=/mem/ram,,1,share=on",
            "-kernel",
            "/k/vmlinux",
            "-initrd",
            "/k/initrd",
            "-append",
            "console=ttyS0 quiet tsc_early_khz=2299998",
            "-chardev",
            "file,id=serial,path=/run/vm/serial.log,append=on",
            "-serial",
            "chardev:serial",
            "-chardev",
            "socket,id=qmp,path=/run/vm/qmp.sock,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-blockdev",
            concat!(
                r#"{"backing":{"backing":{"driver":"raw","file":{"driver":"file","filename":"/run/vm/drives/root.2"},"read-only":true},"#,
                r#""driver":"qcow2","file":{"driver":"file","filename":"/run/vm/drives/root.1"},"read-only":true},"#,
                r#""driver":"qcow2","file":{"driver":"file","filename":"/run/vm/drives/root"},"node-name":"drive_root","read-only":false}"#
            ),
            "-device",
            "virtio-blk-device,drive=drive_root",
            "-blockdev",
            r#"{"driver":"raw","file":{"driver":"file","filename":"/run/vm/drives/data"},"node-name":"drive_data","read-only":true}"#,
            "-device",
            "virtio-blk-device,drive=drive_data",
            "-netdev",
            "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02",
            "-sandbox",
            SANDBOX,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(args, expected);
    }

    #[test]
    fn restore_differs_only_by_incoming() {
        let boot = strings(qemu_args(&plan()));
        let restore = strings(qemu_args(&LaunchPlan {
            incoming: true,
            ..plan()
        }));
        assert_eq!(&restore[..boot.len()], &boot[..]);
        assert_eq!(&restore[boot.len()..], ["-incoming", "defer", "-S"]);
    }

    #[test]
    fn a_private_restore_maps_the_memory_file_copy_on_write() {
        let args = strings(qemu_args(&LaunchPlan {
            incoming: true,
            memory_shared: false,
            ..plan()
        }));
        assert_eq!(
            after(&args, "-object"),
            "memory-backend-file,id=ram,size=256M,mem-path=/mem/ram,,1,share=off"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_tsc_hint() {
        let args = strings(qemu_args(&LaunchPlan {
            accel: Accel::Kvm,
            net: None,
            drives: vec![],
            initrd: None,
            ..plan()
        }));
        assert_eq!(after(&args, "-accel"), "kvm");
        assert_eq!(after(&args, "-cpu"), "host");
        assert_eq!(after(&args, "-append"), "console=ttyS0 quiet");
        assert!(
            !args
                .iter()
                .any(|a| a == "-initrd" || a == "-netdev" || a == "-drive")
        );
        assert_eq!(all_after(&args, "-device"), Vec::<&str>::new());
    }

    #[test]
    fn an_explicit_tsc_hint_is_not_duplicated() {
        let args = strings(qemu_args(&LaunchPlan {
            kernel_args: "tsc_early_khz=1000 console=ttyS0".into(),
            ..plan()
        }));
        assert_eq!(after(&args, "-append"), "tsc_early_khz=1000 console=ttyS0");
    }

    #[test]
    fn option_values_round_trip_commas() {
        let opts = option(&[
            ("memory-backend-file", None),
            ("mem-path", Some("/a,b,,c".as_ref())),
            ("share", Some("on".as_ref())),
        ]);
        assert_eq!(opts, "memory-backend-file,mem-path=/a,,b,,,,c,share=on");
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(
            option_value(opts.as_bytes(), "mem-path"),
            Some(PathBuf::from("/a,b,,c"))
        );
        assert_eq!(
            option_value(opts.as_bytes(), "share"),
            Some(PathBuf::from("on"))
        );
        assert_eq!(option_value(opts.as_bytes(), "size"), None);
    }

    #[test]
    fn input_validation() {
        assert!(validate_vm_id("sbx_01.a-b").is_ok());
        for bad in ["", "a,b", "a b", "a=b", &"x".repeat(65)] {
            assert!(validate_vm_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_net("tap0", "06:00:AC:10:00:02").is_ok());
        assert!(validate_net("tap,0", "06:00:ac:10:00:02").is_err());
        assert!(validate_net("a-very-long-tap-name", "06:00:ac:10:00:02").is_err());
        assert!(validate_net("tap0", "06:00:ac:10:00").is_err());
        assert!(validate_net("tap0", "06:00:ac:10:00:2g").is_err());
        assert!(validate_socket_path(Path::new("/run/vm/qmp.sock")).is_ok());
        assert!(validate_socket_path(&Path::new("/").join("d".repeat(120))).is_err());
    }
}

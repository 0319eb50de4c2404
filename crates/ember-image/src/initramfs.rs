//! The initramfs: a static busybox, the guest's kernel modules, and an
//! `/init` script (`init.sh`) that inserts them, mounts the root disk and
//! switches to its `/sbin/init`. Written as a plain newc cpio archive (the
//! kernel unpacks it uncompressed; it is small).

use std::fs;
use std::path::Path;

use crate::cpio::CpioWriter;
use crate::host::Tool;
use crate::kernel::{KernelEntry, ModuleFile};
use crate::store::write_durable;
use crate::{Error, Result, elf};

const INIT_SCRIPT: &str = include_str!("init.sh");

/// Applets `init.sh` cannot do without.
const NEEDED_APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "insmod",
    "sleep",
    "switch_root",
    "cat",
    "cut",
    "ls",
    "tr",
];

pub(crate) const BUSYBOX: Tool = Tool {
    name: "busybox",
    package: "busybox-static",
};

/// The host's busybox after checking it can run in an initramfs: present,
/// statically linked, and with every applet `init.sh` uses. Returns its
/// bytes and applet names.
pub(crate) fn check_busybox(path: &Path) -> Result<(Vec<u8>, Vec<String>)> {
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::ToolMissing {
            tool: BUSYBOX.name,
            package: BUSYBOX.package,
        },
        _ => Error::io("read", path)(e),
    })?;
    if !elf::is_static(&bytes).unwrap_or(false) {
        return Err(Error::BusyboxNotStatic {
            path: path.to_owned(),
        });
    }
    let mut cmd = std::process::Command::new(path);
    cmd.arg("--list");
    let listed = BUSYBOX.output(&mut cmd)?;
    let applets: Vec<String> = listed
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    if let Some(missing) = NEEDED_APPLETS
        .iter()
        .find(|a| !applets.iter().any(|x| x == *a))
    {
        return Err(Error::ToolOutput {
            tool: path.display().to_string(),
            reason: format!("busybox lacks the {missing} applet the initramfs needs"),
        });
    }
    Ok((bytes, applets))
}

/// The module list `init.sh` reads: `<name> required|optional` per line,
/// in load order.
fn load_order(modules: &[ModuleFile]) -> String {
    modules
        .iter()
        .map(|m| {
            format!(
                "{} {}\n",
                m.name,
                if m.required { "required" } else { "optional" }
            )
        })
        .collect()
}

/// Write the initramfs for a kernel entry to `out`.
pub(crate) fn write(
    out: &Path,
    busybox: &[u8],
    applets: &[String],
    kernel_dir: &Path,
    kernel: &KernelEntry,
) -> Result<()> {
    let io_err = Error::io("write", out);
    let mut w = CpioWriter::new(Vec::new());
    let archive = (|| -> std::io::Result<Vec<u8>> {
        for dir in [
            "bin",
            "dev",
            "lib",
            "lib/modules",
            "newroot",
            "proc",
            "sys",
            "tmp",
        ] {
            w.dir(dir, 0o755)?;
        }
        // The kernel opens /dev/console for init before devtmpfs is mounted.
        w.char_device("dev/console", 0o600, 5, 1)?;
        w.char_device("dev/null", 0o666, 1, 3)?;
        w.file("bin/busybox", 0o755, busybox)?;
        for applet in applets.iter().filter(|a| a.as_str() != "busybox") {
            w.symlink(&format!("bin/{applet}"), "busybox")?;
        }
        for m in &kernel.modules {
            let path = KernelEntry::module_path(kernel_dir, &m.name);
            let bytes = fs::read(&path)?;
            w.file(&format!("lib/modules/{}.ko", m.name), 0o644, &bytes)?;
        }
        w.file(
            "lib/modules/load-order",
            0o644,
            load_order(&kernel.modules).as_bytes(),
        )?;
        w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
        w.finish()
    })()
    .map_err(io_err)?;
    write_durable(out, &archive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{EntryKind, read_archive};

    #[test]
    fn load_order_file_marks_required_modules() {
        let modules = [
            ModuleFile {
                name: "virtio".into(),
                required: true,
            },
            ModuleFile {
                name: "vsock".into(),
                required: false,
            },
        ];
        assert_eq!(load_order(&modules), "virtio required\nvsock optional\n");
    }

    #[test]
    fn init_script_is_valid_shell() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("init");
        fs::write(&script, INIT_SCRIPT).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn archive_has_init_busybox_applets_and_modules_in_order() {
        let Ok((busybox, applets)) = check_busybox(Path::new("/bin/busybox")) else {
            ember_testkit::report_skip(
                module_path!(),
                "no static busybox at /bin/busybox: apt-get install busybox-static",
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("kernel");
        fs::create_dir_all(kdir.join("modules")).unwrap();
        for name in ["virtio_ring", "virtio_blk"] {
            fs::write(KernelEntry::module_path(&kdir, name), format!("ko:{name}")).unwrap();
        }
        let kernel = KernelEntry {
            package: "p".into(),
            version: "v".into(),
            release: "r".into(),
            pvh_entry: 0,
            modules: vec![
                ModuleFile {
                    name: "virtio_ring".into(),
                    required: true,
                },
                ModuleFile {
                    name: "virtio_blk".into(),
                    required: true,
                },
            ],
            builtin: vec![],
            unavailable: vec![],
        };
        let out = dir.path().join("initrd");
        write(&out, &busybox, &applets, &kdir, &kernel).unwrap();
        let entries = read_archive(&fs::read(&out).unwrap()).unwrap();
        let get = |p: &str| entries.iter().find(|e| e.path == p).map(|e| e.kind.clone());
        assert_eq!(
            get("init"),
            Some(EntryKind::File(INIT_SCRIPT.as_bytes().to_vec()))
        );
        assert_eq!(get("bin/busybox"), Some(EntryKind::File(busybox)));
        assert_eq!(
            get("bin/switch_root"),
            Some(EntryKind::Symlink("busybox".into()))
        );
        assert_eq!(
            get("dev/console"),
            Some(EntryKind::CharDevice { major: 5, minor: 1 })
        );
        assert_eq!(
            get("lib/modules/virtio_blk.ko"),
            Some(EntryKind::File(b"ko:virtio_blk".to_vec()))
        );
        assert_eq!(
            get("lib/modules/load-order"),
            Some(EntryKind::File(
                b"virtio_ring required\nvirtio_blk required\n".to_vec()
            ))
        );
    }

    #[test]
    fn a_dynamic_busybox_is_refused_with_the_package_to_install() {
        // Any dynamically linked program stands in for the non-static busybox.
        let err = check_busybox(Path::new("/bin/sh")).unwrap_err();
        assert!(
            err.to_string().contains("apt-get install busybox-static"),
            "{err}"
        );
        let err = check_busybox(Path::new("/nonexistent/busybox")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "busybox not found: apt-get install busybox-static"
        );
    }
}

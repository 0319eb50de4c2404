//! What the QEMU tests and benchmark need to boot a real guest: the kernel
//! (from `EMBER_TEST_KERNEL`), a tiny initramfs built here from a static
//! busybox and a counting `/init`, and readers for the serial console.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_vmm::{Launch, MachineSpec, VmConfig};

/// Kernel arguments for the test guest: console on the serial port, the
/// slow parts of a TCG boot off, and a panic ends QEMU (`-no-reboot`)
/// instead of hanging the test.
pub const KERNEL_ARGS: &str =
    "console=ttyS0 quiet cryptomgr.notests lsm=capability audit=0 pci=off panic=-1";

/// The guest's `/init`: say it started, write 1 MiB of random bytes to the
/// initramfs (guest RAM), print its checksum once, then print a counter every
/// ~100 ms and the checksum again every tenth tick.
const INIT: &str = r#"#!/bin/busybox sh
echo INIT
bb=/bin/busybox
$bb mount -t devtmpfs dev /dev
$bb mount -t proc proc /proc
$bb dd if=/dev/urandom of=/pattern bs=65536 count=16 2>/dev/null
echo "PATTERN $($bb md5sum /pattern | $bb cut -d' ' -f1)"
i=0
while true; do
  echo "TICK $i"
  if [ $((i % 10)) -eq 0 ]; then
    echo "SUM $i $($bb md5sum /pattern | $bb cut -d' ' -f1)"
  fi
  i=$((i + 1))
  $bb usleep 100000
done
"#;

/// The guest kernel, or why there is none: `EMBER_TEST_KERNEL` (an
/// uncompressed vmlinux), else the one `ember image build` left in
/// `$EMBER_DATA_DIR/images/current/`.
pub fn kernel() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("EMBER_TEST_KERNEL").map(PathBuf::from) {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "EMBER_TEST_KERNEL={} is not a file",
                path.display()
            ))
        };
    }
    let data = std::env::var_os("EMBER_DATA_DIR").unwrap_or_else(|| "/var/lib/ember".into());
    let built = Path::new(&data).join("images/current/vmlinux");
    if built.is_file() {
        return Ok(built);
    }
    Err(format!(
        "no guest kernel: set EMBER_TEST_KERNEL to an uncompressed vmlinux (see MACHINE.md) \
         or run `ember image build` (looked for {})",
        built.display()
    ))
}

/// A statically linked busybox (Debian: `busybox-static`), or why there is none.
pub fn busybox() -> Result<PathBuf, String> {
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        let Ok(bytes) = std::fs::read(candidate) else {
            continue;
        };
        // A dynamic executable names its loader; the static one cannot run
        // in an initramfs without libc.
        if !bytes.windows(10).any(|w| w == b"/lib64/ld-") {
            return Ok(candidate.into());
        }
    }
    Err("no statically linked busybox (apt-get install busybox-static)".into())
}

pub fn qemu_available() -> Result<(), String> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join("qemu-system-x86_64").is_file());
    if found {
        Ok(())
    } else {
        Err("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into())
    }
}

/// Everything a guest boot needs, or why it cannot happen here.
pub fn guest_prerequisites() -> Result<PathBuf, String> {
    qemu_available()?;
    busybox()?;
    kernel()
}

/// Write the test initramfs to `path`.
pub fn write_initramfs(path: &Path) {
    let busybox = std::fs::read(busybox().expect("checked by the caller")).unwrap();
    let mut cpio = Newc::default();
    cpio.dir("bin");
    cpio.dir("dev");
    cpio.dir("proc");
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, INIT.as_bytes());
    // The console must exist before devtmpfs is mounted: the kernel opens it
    // for init's stdio.
    cpio.char_device("dev/console", 0o600, 5, 1);
    std::fs::write(path, cpio.finish()).unwrap();
}

/// A `newc` cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
pub struct Newc {
    out: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data, (0, 0));
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | perm, &[], (major, minor));
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.next_ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs entries are small"),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap(),
            0, // check (unused by newc)
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            write!(self.out, "{field:08x}").unwrap();
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

/// A directory holding one test's kernel inputs and VM run directories.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Workspace {
    pub fn new(kernel: PathBuf) -> Workspace {
        // Short path: QMP socket paths must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ember-qemu-")
            .tempdir_in("/tmp")
            .unwrap();
        let initrd = dir.path().join("initrd.cpio");
        write_initramfs(&initrd);
        Workspace {
            dir,
            kernel,
            initrd,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A launch with its own run directory and RAM file.
    pub fn launch(&self, vm_id: &str, memory_mib: u32) -> Launch {
        let run_dir = self.path().join(vm_id);
        std::fs::create_dir_all(&run_dir).unwrap();
        Launch {
            vm_id: vm_id.into(),
            memory_file: Some(self.path().join(format!("{vm_id}.ram"))),
            confinement: None,
            run_dir,
            config: VmConfig {
                machine: MachineSpec {
                    vcpus: 1,
                    memory_mib,
                },
                kernel: self.kernel.clone(),
                initrd: Some(self.initrd.clone()),
                kernel_args: KERNEL_ARGS.into(),
                drives: vec![],
                net: None,
            },
        }
    }
}

/// Copy only the data extents of `src` (a mostly empty RAM file), as a
/// caller preparing a private copy for a restore would.
pub fn copy_sparse(src: &Path, dst: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut from = std::fs::File::open(src).unwrap();
    let len = from.metadata().unwrap().len();
    let mut to = std::fs::File::create(dst).unwrap();
    to.set_len(len).unwrap();
    let fd = from.as_raw_fd();
    let mut offset: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // SAFETY: lseek on an open descriptor; no memory is passed.
        let data = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past `offset`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        from.seek(SeekFrom::Start(data as u64)).unwrap();
        to.seek(SeekFrom::Start(data as u64)).unwrap();
        let mut left = (hole - data) as usize;
        while left > 0 {
            let chunk = left.min(buf.len());
            let n = from.read(&mut buf[..chunk]).unwrap();
            assert!(n > 0);
            to.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        offset = hole;
    }
}

/// What the test guest has printed so far.
#[derive(Debug, Default, Clone)]
pub struct Console {
    /// `/init` started.
    pub init: bool,
    pub pattern: Option<String>,
    pub ticks: Vec<u64>,
    /// (tick, checksum) pairs.
    pub sums: Vec<(u64, String)>,
}

impl Console {
    pub fn read(path: &Path) -> Console {
        let mut bytes = std::fs::read(path).unwrap_or_default();
        // A VM paused or snapshotted mid-line finishes that line elsewhere
        // (after resume, or in the restored VM's log): count whole lines only.
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(complete);
        let text = String::from_utf8_lossy(&bytes);
        let mut console = Console::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["INIT"] => console.init = true,
                ["PATTERN", sum] => console.pattern = Some(sum.to_string()),
                ["TICK", n] => {
                    if let Ok(n) = n.parse() {
                        console.ticks.push(n);
                    }
                }
                ["SUM", n, sum] => {
                    if let Ok(n) = n.parse() {
                        console.sums.push((n, sum.to_string()));
                    }
                }
                _ => {}
            }
        }
        console
    }

    pub fn last_tick(&self) -> Option<u64> {
        self.ticks.last().copied()
    }
}

/// Poll the console until `done` holds, or panic with what it holds after `limit`.
pub async fn wait_console(
    path: &Path,
    limit: Duration,
    done: impl Fn(&Console) -> bool,
) -> Console {
    let started = Instant::now();
    loop {
        let console = Console::read(path);
        if done(&console) {
            return console;
        }
        if started.elapsed() > limit {
            let raw = std::fs::read_to_string(path).unwrap_or_default();
            let tail: Vec<&str> = raw.lines().rev().take(15).collect();
            panic!(
                "console {} did not reach the expected state in {limit:?}; last lines:\n{}",
                path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sockets left in a run directory (there must be none after a VM is gone).
pub fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_socket() {
                found.push(e.path());
            } else if t.is_dir() {
                stack.push(e.path());
            }
        }
    }
    found
}

/// Is `pid` still a process (a zombie counts: it was not reaped)?
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// PIDs of QEMU processes started for `vm_id`.
pub fn qemu_pids_for(vm_id: &str) -> Vec<u32> {
    let needle = format!("guest={vm_id}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == needle.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

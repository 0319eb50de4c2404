//! The guest kernel: resolving Debian's kernel metapackage to a concrete
//! package, fetching and unpacking it, turning its bzImage into the
//! uncompressed ELF `vmlinux` that PVH boot needs, and picking the modules
//! the initramfs inserts. The result is one kernel cache entry:
//!
//! ```text
//! kernel/<key>/vmlinux
//! kernel/<key>/modules/<name>.ko     in load order, see kernel.json
//! kernel/<key>/kernel.json
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host::{self, APT_CACHE, APT_GET, DEPMOD, DPKG_DEB};
use crate::lz4::{self, LEGACY_MAGIC};
use crate::modules::{self, GUEST_MODULES, ModuleDeps};
use crate::progress::{Progress, Step, StepTimer};
use crate::store::write_durable;
use crate::{Error, Result, elf};

/// A concrete kernel package and version, as apt names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPackage {
    pub name: String,
    pub version: String,
}

/// What a kernel cache entry holds, stored as `kernel.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KernelEntry {
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub pvh_entry: u64,
    /// In load order.
    pub modules: Vec<ModuleFile>,
    /// Requested modules the kernel has built in.
    pub builtin: Vec<String>,
    /// Optional modules this kernel lacks.
    pub unavailable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ModuleFile {
    pub name: String,
    pub required: bool,
}

impl KernelEntry {
    pub(crate) fn load(dir: &Path) -> Option<KernelEntry> {
        let text = fs::read(dir.join("kernel.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub(crate) fn module_path(dir: &Path, name: &str) -> PathBuf {
        dir.join("modules").join(format!("{name}.ko"))
    }
}

/// One field of the first paragraph of `apt-cache show` output.
fn control_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == field).then_some(v.trim())
    })
}

/// Resolve `package` (a metapackage like `linux-image-cloud-amd64`, or
/// already a concrete `linux-image-<release>`) to the package holding the
/// kernel, with the version apt would install.
pub(crate) fn resolve(package: &str) -> Result<KernelPackage> {
    let mut name = package.to_owned();
    // Metapackages point at the concrete package through Depends; two hops
    // cover every Debian kernel flavour.
    for _ in 0..3 {
        let mut cmd = APT_CACHE.command()?;
        cmd.args(["show", "--no-all-versions", &name]);
        let shown = match APT_CACHE.output(&mut cmd) {
            Ok(text) if !text.trim().is_empty() => text,
            Ok(_) => return Err(Error::PackageUnknown { package: name }),
            Err(Error::CommandFailed { output, .. })
                if output.contains("No packages found") || output.contains("Unable to locate") =>
            {
                return Err(Error::PackageUnknown { package: name });
            }
            Err(e) => return Err(e),
        };
        let version = control_field(&shown, "Version").ok_or_else(|| Error::ToolOutput {
            tool: "apt-cache".into(),
            reason: format!("no Version for {name}"),
        })?;
        let next = control_field(&shown, "Depends").and_then(|deps| {
            deps.split(',')
                .filter_map(|d| d.split_whitespace().next())
                .find(|d| d.starts_with("linux-image-") && *d != name)
        });
        match next {
            Some(dep) => name = dep.to_owned(),
            None => {
                return Ok(KernelPackage {
                    name,
                    version: version.to_owned(),
                });
            }
        }
    }
    Err(Error::ToolOutput {
        tool: "apt-cache".into(),
        reason: format!("{package} does not lead to a concrete kernel package"),
    })
}

/// [`resolve`], remembered in `memo` until apt's package lists or
/// configuration change. `apt-cache` can take seconds per call (it rebuilds
/// its cache every time where `pkgcache.bin` is disabled, as in
/// containers), and this runs on every `ensure`, cache hits included.
pub(crate) fn resolve_remembered(package: &str, memo: &Path) -> Result<KernelPackage> {
    #[derive(Serialize, Deserialize)]
    struct Memo {
        package: String,
        apt_state: String,
        name: String,
        version: String,
    }
    let apt_state = apt_state();
    if let Some(m) = fs::read(memo)
        .ok()
        .and_then(|b| serde_json::from_slice::<Memo>(&b).ok())
        && m.package == package
        && m.apt_state == apt_state
    {
        return Ok(KernelPackage {
            name: m.name,
            version: m.version,
        });
    }
    let resolved = resolve(package)?;
    let json = serde_json::to_vec(&Memo {
        package: package.to_owned(),
        apt_state,
        name: resolved.name.clone(),
        version: resolved.version.clone(),
    })
    .expect("Memo serialises");
    // Best effort: without the memo the next call just asks apt again.
    let tmp = memo.with_extension(format!("tmp.{}", std::process::id()));
    if fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, memo))
        .is_err()
    {
        let _ = fs::remove_file(&tmp);
    }
    Ok(resolved)
}

/// A fingerprint of what decides apt's candidate versions: its package
/// lists and configuration (names, sizes and modification times).
fn apt_state() -> String {
    let mut parts = Vec::new();
    let mut add = |path: &Path| {
        if let Ok(meta) = fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            parts.push((
                path.display().to_string(),
                format!("{} {} {}", meta.len(), meta.mtime(), meta.mtime_nsec()),
            ));
        }
    };
    for file in ["/etc/apt/sources.list", "/etc/apt/preferences"] {
        add(Path::new(file));
    }
    for dir in [
        "/var/lib/apt/lists",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences.d",
        "/etc/apt/apt.conf.d",
    ] {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for entry in entries {
            add(&entry);
        }
    }
    let borrowed: Vec<(&str, &str)> = parts
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    crate::store::key(&borrowed)
}

/// Build a kernel cache entry in `entry` (which must not exist), using
/// `work` for the download. Reports the `Kernel` and `Modules` steps.
pub(crate) fn build(
    pkg: &KernelPackage,
    work: &Path,
    entry: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<KernelEntry> {
    let mut timer = StepTimer::start(Step::Kernel, progress);
    let unpacked = work.join("unpacked");
    fetch_and_unpack(pkg, work, &unpacked, &mut timer)?;
    let vmlinuz = find_vmlinuz(&unpacked)?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let vmlinux = extract_vmlinux(&vmlinuz)?;
    let vmlinux_path = entry.join("vmlinux");
    let pvh_entry = check_pvh(&vmlinux, &vmlinux_path)?;
    fs::create_dir_all(entry.join("modules")).map_err(Error::io("create", entry))?;
    write_durable(&vmlinux_path, &vmlinux)?;
    timer.detail(format!(
        "{} {}: vmlinux {} MiB, PVH entry {pvh_entry:#x}",
        pkg.name,
        pkg.version,
        vmlinux.len() >> 20
    ));
    timer.finish(false);

    let mut timer = StepTimer::start(Step::Modules, progress);
    let moddir = unpacked.join("lib/modules").join(&release);
    let resolution = resolve_modules(&unpacked, &moddir, &release)?;
    for m in &resolution.load_order {
        if !m.path.ends_with(".ko") {
            return Err(Error::KernelFormat {
                path: moddir.join(&m.path),
                reason: "compressed kernel modules are not supported; busybox insmod needs plain .ko files".into(),
            });
        }
        let src = moddir.join(&m.path);
        let dst = KernelEntry::module_path(entry, &m.name);
        fs::copy(&src, &dst).map_err(Error::io("copy", &src))?;
    }
    let names: Vec<_> = resolution
        .load_order
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    timer.detail(format!("load order: {}", names.join(" ")));
    if !resolution.unavailable.is_empty() {
        timer.detail(format!(
            "not in this kernel (optional): {}",
            resolution.unavailable.join(" ")
        ));
    }
    let kernel = KernelEntry {
        package: pkg.name.clone(),
        version: pkg.version.clone(),
        release,
        pvh_entry,
        modules: resolution
            .load_order
            .iter()
            .map(|m| ModuleFile {
                name: m.name.clone(),
                required: m.required,
            })
            .collect(),
        builtin: resolution.builtin,
        unavailable: resolution.unavailable,
    };
    let json = serde_json::to_vec_pretty(&kernel).expect("KernelEntry serialises");
    write_durable(&entry.join("kernel.json"), &json)?;
    timer.finish(false);
    Ok(kernel)
}

fn fetch_and_unpack(
    pkg: &KernelPackage,
    work: &Path,
    unpacked: &Path,
    timer: &mut StepTimer<'_>,
) -> Result<()> {
    let download = work.join("download");
    fs::create_dir_all(&download).map_err(Error::io("create", &download))?;
    // apt drops privileges to _apt for downloads and warns when _apt cannot
    // write the target directory.
    if let Ok(Some(user)) = nix::unistd::User::from_name("_apt") {
        let _ = nix::unistd::chown(&download, Some(user.uid), None);
    }
    let mut cmd = APT_GET.command()?;
    cmd.current_dir(&download)
        .args(["download", &format!("{}={}", pkg.name, pkg.version)]);
    APT_GET
        .stream(cmd, |line| timer.detail(line))
        .map_err(|e| host::mirror_hint(e, "apt's package sources"))?;
    let deb = fs::read_dir(&download)
        .map_err(Error::io("read", &download))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::ToolOutput {
            tool: "apt-get download".into(),
            reason: format!("no .deb for {} in {}", pkg.name, download.display()),
        })?;
    let mut cmd = DPKG_DEB.command()?;
    cmd.arg("-x").arg(&deb).arg(unpacked);
    DPKG_DEB.stream(cmd, |line| timer.detail(line))
}

fn find_vmlinuz(unpacked: &Path) -> Result<PathBuf> {
    let boot = unpacked.join("boot");
    let found: Vec<_> = fs::read_dir(&boot)
        .map_err(Error::io("read", &boot))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(Error::KernelFormat {
            path: boot,
            reason: format!(
                "expected one vmlinuz-* in the package, found {}",
                found.len()
            ),
        }),
    }
}

fn resolve_modules(unpacked: &Path, moddir: &Path, release: &str) -> Result<modules::Resolution> {
    let dep_file = moddir.join("modules.dep");
    // Debian's packages leave modules.dep to the postinst's depmod.
    if !dep_file.exists() {
        let mut cmd = DEPMOD.command()?;
        cmd.arg("-b").arg(unpacked).arg(release);
        DEPMOD.output(&mut cmd)?;
    }
    let text = fs::read_to_string(&dep_file).map_err(Error::io("read", &dep_file))?;
    let deps = ModuleDeps::parse(&text)?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin"))
        .map(|t| modules::parse_builtin(&t))
        .unwrap_or_default();
    modules::resolve(&deps, &builtin, GUEST_MODULES)
}

/// Read a kernel image (a bzImage, or already a `vmlinux`) and return the
/// uncompressed ELF kernel. Only LZ4-compressed bzImages are supported
/// (Debian's x86-64 kernels).
pub fn extract_vmlinux(path: &Path) -> Result<Vec<u8>> {
    let data = fs::read(path).map_err(Error::io("read", path))?;
    vmlinux_from_bzimage(&data).map_err(|reason| Error::KernelFormat {
        path: path.to_owned(),
        reason,
    })
}

/// Check that `vmlinux` can be booted through PVH; returns its entry point.
pub(crate) fn check_pvh(vmlinux: &[u8], path: &Path) -> Result<u64> {
    let entry = elf::pvh_entry(vmlinux).map_err(|e| Error::KernelFormat {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    entry.ok_or_else(|| Error::NoPvhEntry {
        path: path.to_owned(),
    })
}

fn vmlinux_from_bzimage(data: &[u8]) -> Result<Vec<u8>, String> {
    if data.starts_with(b"\x7fELF") {
        return Ok(data.to_vec());
    }
    let payload = bzimage_payload(data);
    let stream = match payload {
        Some(p) if p.starts_with(&LEGACY_MAGIC) => p,
        Some(p) => {
            let kind = compression_name(p).unwrap_or("an unknown format");
            return Err(format!(
                "the kernel payload is compressed with {kind}; Ember can only extract LZ4 (legacy frame)"
            ));
        }
        // Not a bzImage (or one with an old header): look for the stream.
        None => {
            let at = data
                .windows(4)
                .position(|w| w == LEGACY_MAGIC)
                .ok_or("neither an ELF vmlinux nor a bzImage with an LZ4 payload")?;
            &data[at..]
        }
    };
    let decoded = lz4::decompress_legacy(stream).map_err(|e| e.to_string())?;
    // The kernel build appends the uncompressed size to the payload.
    if payload.is_some() && decoded.consumed + 4 == stream.len() {
        let expected = u32::from_le_bytes(stream[decoded.consumed..].try_into().expect("4 bytes"));
        if expected as usize != decoded.data.len() {
            return Err(format!(
                "LZ4 payload decompressed to {} bytes, but the kernel records {expected}: truncated or corrupt",
                decoded.data.len()
            ));
        }
    }
    if !decoded.data.starts_with(b"\x7fELF") {
        return Err("the decompressed payload is not an ELF kernel".into());
    }
    Ok(decoded.data)
}

/// The compressed payload of a bzImage, located through its setup header
/// (boot protocol 2.08+: `payload_offset` and `payload_length`).
fn bzimage_payload(data: &[u8]) -> Option<&[u8]> {
    if data.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let version = u16::from_le_bytes(data.get(0x206..0x208)?.try_into().ok()?);
    if version < 0x208 {
        return None;
    }
    let setup_sects = match *data.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32::from_le_bytes(data.get(0x248..0x24c)?.try_into().ok()?) as usize;
    let length = u32::from_le_bytes(data.get(0x24c..0x250)?.try_into().ok()?) as usize;
    let start = (setup_sects + 1) * 512 + offset;
    data.get(start..start.checked_add(length)?)
}

fn compression_name(payload: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(&[u8], &str)] = &[
        (b"\x1f\x8b", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh", "bzip2"),
        (b"\x5d\x00\x00", "lzma"),
        (b"\x89LZO", "lzo"),
        (b"\x04\x22\x4d\x18", "LZ4 (modern frame)"),
    ];
    MAGICS
        .iter()
        .find(|(m, _)| payload.starts_with(m))
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::pvh_kernel;
    use crate::lz4::tests::compress_legacy;

    /// A bzImage shell around `payload`: boot sector, setup header with
    /// payload_offset/length, setup sectors, then the payload and whatever
    /// follows it (a signature).
    fn bzimage(payload: &[u8], after: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let offset = 0x100u32;
        img[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend(std::iter::repeat_n(0xcc, offset as usize));
        img.extend_from_slice(payload);
        img.extend_from_slice(after);
        img
    }

    fn kernel_payload(vmlinux: &[u8]) -> Vec<u8> {
        let mut p = compress_legacy(vmlinux);
        p.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        p
    }

    #[test]
    fn extracts_the_elf_from_a_bzimage_with_trailing_signature() {
        let mut vmlinux = pvh_kernel(0x0100_0000);
        vmlinux.resize(9 << 20, 0x5a); // more than one LZ4 block
        let img = bzimage(&kernel_payload(&vmlinux), b"~Module signature appended~\n");
        let out = vmlinux_from_bzimage(&img).unwrap();
        assert!(out == vmlinux);
        assert_eq!(check_pvh(&out, Path::new("vmlinux")).unwrap(), 0x0100_0000);
    }

    #[test]
    fn finds_the_stream_by_magic_without_a_setup_header() {
        let vmlinux = pvh_kernel(0x2000);
        let mut img = vec![0u8; 3000];
        img.extend(kernel_payload(&vmlinux));
        img.extend_from_slice(&[0xee; 100]);
        assert_eq!(vmlinux_from_bzimage(&img).unwrap(), vmlinux);
    }

    #[test]
    fn a_size_mismatch_is_reported_as_corruption() {
        let vmlinux = pvh_kernel(0x2000);
        let mut payload = compress_legacy(&vmlinux);
        payload.extend_from_slice(&(vmlinux.len() as u32 + 1).to_le_bytes());
        let err = vmlinux_from_bzimage(&bzimage(&payload, &[])).unwrap_err();
        assert!(err.contains("truncated or corrupt"), "{err}");
    }

    #[test]
    fn other_compressions_are_named_in_the_error() {
        let err =
            vmlinux_from_bzimage(&bzimage(b"\x28\xb5\x2f\xfd rest of zstd", &[])).unwrap_err();
        assert!(err.contains("zstd"), "{err}");
        assert!(vmlinux_from_bzimage(b"just some bytes").is_err());
    }

    #[test]
    fn a_kernel_without_pvh_is_a_clear_error() {
        let no_pvh = crate::elf::tests::elf_with_segments(&[(1, vec![0; 16])]);
        let vmlinux = vmlinux_from_bzimage(&bzimage(&kernel_payload(&no_pvh), &[])).unwrap();
        let err = check_pvh(&vmlinux, Path::new("/x/vmlinux")).unwrap_err();
        assert!(
            err.to_string().contains("XEN_ELFNOTE_PHYS32_ENTRY"),
            "{err}"
        );
    }

    #[test]
    fn apt_cache_fields() {
        let shown = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(control_field(shown, "Version"), Some("6.1.192-2"));
        assert_eq!(
            control_field(shown, "Depends"),
            Some("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)")
        );
        assert_eq!(control_field(shown, "Pre-Depends"), None);
    }
}

//! An image — `vmlinux`, `initrd`, `rootfs.ext4` and their manifest — and
//! the build pipeline that produces it from an [`ImageSpec`], reusing each
//! cached layer whose inputs are unchanged.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kernel::{self, KernelEntry, KernelPackage};
use crate::modules::GUEST_MODULES;
use crate::progress::{Progress, Step, StepTimer};
use crate::store::{self, Store, write_durable};
use crate::{DEFAULT_KERNEL_ARGS, Error, Result, host, initramfs, rootfs};

/// Bump when the pipeline's output changes for the same inputs (a new
/// init script, a different mkfs option, another module), so every cache
/// layer is rebuilt.
const FORMAT_VERSION: u32 = 2;

pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
pub const DEFAULT_SUITE: &str = "bookworm";
pub const DEFAULT_DISK_SIZE: u64 = 2 << 30;
const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Packages on top of debootstrap's minbase. What code run by agents,
/// notebooks and CI jobs reaches for first, and little else:
/// - python3, python3-venv: the language most sandboxed code is in; venv
///   brings pip into a virtualenv (Debian's system pip refuses installs);
/// - bash, coreutils, procps, less, vim-tiny: a usable shell session;
/// - ca-certificates, curl, netbase: HTTPS downloads, /etc/services;
/// - iproute2: `ip`, for looking at the guest's network;
/// - git: cloning and committing is most of what coding agents and CI do.
pub const DEFAULT_PACKAGES: &[&str] = &[
    "bash",
    "ca-certificates",
    "coreutils",
    "curl",
    "git",
    "iproute2",
    "less",
    "netbase",
    "procps",
    "python3",
    "python3-venv",
    "vim-tiny",
];

/// Ember's data directory: `explicit` if given, else `$EMBER_DATA_DIR`,
/// else `/var/lib/ember`.
pub fn data_dir(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("EMBER_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/ember"))
}

/// The `ember-guest` binary to install: `$EMBER_GUEST_BIN`, else an
/// `ember-guest` next to the running executable (where cargo puts it).
pub fn default_guest_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EMBER_GUEST_BIN") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("ember-guest")))
        .unwrap_or_else(|| PathBuf::from("ember-guest"))
}

/// What an image is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Installed as the guest's `/sbin/init`.
    pub guest_binary: PathBuf,
    /// A Debian kernel (meta)package; resolved through apt to a version.
    pub kernel_package: String,
    pub suite: String,
    /// `None`: the host apt configuration's mirror for `suite`, else
    /// `http://deb.debian.org/debian`. Not part of any cache key: the same
    /// suite and packages from another mirror are the same tree.
    pub mirror: Option<String>,
    pub packages: Vec<String>,
    /// Apparent size of `rootfs.ext4`; only used blocks take disk space.
    pub disk_size: u64,
    /// A statically linked busybox for the initramfs.
    pub busybox: PathBuf,
}

impl ImageSpec {
    /// The default image around `guest_binary`.
    pub fn new(guest_binary: impl Into<PathBuf>) -> Self {
        ImageSpec {
            guest_binary: guest_binary.into(),
            kernel_package: DEFAULT_KERNEL_PACKAGE.into(),
            suite: DEFAULT_SUITE.into(),
            mirror: None,
            packages: DEFAULT_PACKAGES.iter().map(|p| p.to_string()).collect(),
            disk_size: DEFAULT_DISK_SIZE,
            busybox: PathBuf::from(DEFAULT_BUSYBOX),
        }
    }
}

impl Default for ImageSpec {
    /// The default image around [`default_guest_binary`].
    fn default() -> Self {
        ImageSpec::new(default_guest_binary())
    }
}

/// Describes a built image; stored as `manifest.json` in its directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub created_unix: u64,
    pub kernel: KernelInfo,
    /// Modules the initramfs inserts, in order.
    pub modules: Vec<String>,
    pub suite: String,
    pub packages: Vec<String>,
    pub guest_sha256: String,
    pub busybox_sha256: String,
    pub disk_size: u64,
    /// The command line this image is meant to boot with (see
    /// [`DEFAULT_KERNEL_ARGS`]).
    pub kernel_args: String,
    pub kernel_key: String,
    pub tree_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub package: String,
    pub version: String,
    /// `uname -r`.
    pub release: String,
}

/// A built guest image. Its files never change once it exists: qcow2
/// overlays and snapshots point at `rootfs` by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub dir: PathBuf,
    /// Uncompressed ELF kernel with a PVH entry point.
    pub vmlinux: PathBuf,
    /// newc cpio initramfs.
    pub initrd: PathBuf,
    /// ext4 root filesystem, raw, sparse, read-only (mode 0444).
    pub rootfs: PathBuf,
    pub manifest: Manifest,
}

const MANIFEST: &str = "manifest.json";

/// The inputs of a build, resolved and hashed.
struct Inputs {
    kernel: KernelPackage,
    guest_sha256: String,
    busybox: Vec<u8>,
    busybox_sha256: String,
    applets: Vec<String>,
    packages: Vec<String>,
    kernel_key: String,
    tree_key: String,
    key: String,
}

impl Inputs {
    fn resolve(spec: &ImageSpec, store: &Store) -> Result<Inputs> {
        if !spec.guest_binary.is_file() {
            return Err(Error::GuestBinaryMissing {
                path: spec.guest_binary.clone(),
            });
        }
        let guest_sha256 = store::file_sha256(&spec.guest_binary)?;
        let (busybox, applets) = initramfs::check_busybox(&spec.busybox)?;
        let busybox_sha256 = {
            use sha2::Digest;
            store::hex(&sha2::Sha256::digest(&busybox))
        };
        let kernel = kernel::resolve_remembered(
            &spec.kernel_package,
            &store.kernel_resolution(&spec.kernel_package),
        )?;
        let mut packages = spec.packages.clone();
        packages.sort();
        packages.dedup();
        let keys = Keys::compute(
            &kernel,
            &spec.suite,
            &packages,
            &guest_sha256,
            &busybox_sha256,
            spec.disk_size,
        );
        Ok(Inputs {
            kernel,
            guest_sha256,
            busybox,
            busybox_sha256,
            applets,
            packages,
            kernel_key: keys.kernel,
            tree_key: keys.tree,
            key: keys.image,
        })
    }
}

/// The cache keys of an image's layers. Each covers only what its layer
/// depends on, so changing the guest binary re-packs but reuses the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Keys {
    kernel: String,
    tree: String,
    image: String,
}

impl Keys {
    fn compute(
        kernel: &KernelPackage,
        suite: &str,
        packages: &[String],
        guest_sha256: &str,
        busybox_sha256: &str,
        disk_size: u64,
    ) -> Keys {
        let format = FORMAT_VERSION.to_string();
        let modules: Vec<_> = GUEST_MODULES.iter().map(|m| m.name).collect();
        let kernel = store::key(&[
            ("format", &format),
            ("kernel-package", &kernel.name),
            ("kernel-version", &kernel.version),
            ("modules", &modules.join(" ")),
        ]);
        let tree = store::key(&[
            ("format", &format),
            ("suite", suite),
            ("packages", &packages.join(" ")),
        ]);
        let image = store::key(&[
            ("format", &format),
            ("kernel", &kernel),
            ("tree", &tree),
            ("guest", guest_sha256),
            ("busybox", busybox_sha256),
            ("disk-size", &disk_size.to_string()),
            ("kernel-args", DEFAULT_KERNEL_ARGS),
        ]);
        Keys {
            kernel,
            tree,
            image,
        }
    }
}

/// Check for every tool the steps about to run need, so a missing one is
/// reported before minutes of work rather than after.
fn preflight(build_kernel: bool, build_tree: bool) -> Result<()> {
    let mut tools = vec![host::MKFS_EXT4, host::CP];
    if build_kernel {
        tools.extend([host::APT_GET, host::DPKG_DEB, host::DEPMOD]);
    }
    if build_tree {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        tools.extend([host::DEBOOTSTRAP, host::CHROOT]);
    }
    tools.iter().try_for_each(|tool| tool.path().map(drop))
}

/// Report a step whose result came from the cache.
fn cached(step: Step, progress: &mut dyn FnMut(Progress)) {
    StepTimer::start(step, progress).finish(true);
}

impl Image {
    /// The image for `spec` under `data_dir`, built if missing or if any of
    /// its inputs changed (kernel package version, package list, guest or
    /// busybox binary, disk size, pipeline format). Blocks for as long as a
    /// build takes (minutes when debootstrap runs); run it on a blocking
    /// thread. Concurrent callers, in this process or others, serialise on
    /// a lock and share the result.
    pub fn ensure(
        data_dir: &Path,
        spec: &ImageSpec,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Image> {
        let store = Store::open(data_dir)?;
        let mut timer = StepTimer::start(Step::Inputs, progress);
        let inputs = Inputs::resolve(spec, &store)?;
        timer.detail(format!(
            "{} {}, image {}",
            inputs.kernel.name, inputs.kernel.version, inputs.key
        ));
        timer.finish(false);

        let image_dir = store.image_dir(&inputs.key);
        if let Ok(image) = Image::open(&image_dir) {
            return Self::hit(&store, image, progress);
        }
        let lock = store.lock(progress)?;
        // Another builder may have made it while this one waited.
        if let Ok(image) = Image::open(&image_dir) {
            return Self::hit(&store, image, progress);
        }
        store.clear_stale(&lock)?;

        let kernel_dir = store.kernel_dir(&inputs.kernel_key);
        let tree_dir = store.tree_dir(&inputs.tree_key);
        let cached_kernel = KernelEntry::load(&kernel_dir);
        preflight(cached_kernel.is_none(), !tree_dir.is_dir())?;
        let kernel = match cached_kernel {
            Some(entry) => {
                cached(Step::Kernel, progress);
                cached(Step::Modules, progress);
                entry
            }
            None => {
                let staging = store.staging(&lock, "kernel")?;
                let entry_dir = staging.path().join("entry");
                let entry = kernel::build(&inputs.kernel, staging.path(), &entry_dir, progress)?;
                staging.publish("entry", &kernel_dir)?;
                entry
            }
        };

        if tree_dir.is_dir() {
            cached(Step::RootTree, progress);
        } else {
            let mut timer = StepTimer::start(Step::RootTree, progress);
            let staging = store.staging(&lock, "tree")?;
            let mirror = spec
                .mirror
                .clone()
                .unwrap_or_else(|| host::host_mirror(&spec.suite));
            timer.detail(format!("debootstrap {} from {mirror}", spec.suite));
            rootfs::build_tree(
                &staging.path().join("root"),
                &spec.suite,
                &mirror,
                &inputs.packages,
                &mut timer,
            )?;
            staging.publish("root", &tree_dir)?;
            timer.finish(false);
        }

        let staging = store.staging(&lock, "image")?;
        let out = staging.path().join("image");
        fs::create_dir(&out).map_err(Error::io("create", &out))?;
        let vmlinux = out.join("vmlinux");
        // Kernel entries are immutable too, so the image can share the file.
        if fs::hard_link(kernel_dir.join("vmlinux"), &vmlinux).is_err() {
            fs::copy(kernel_dir.join("vmlinux"), &vmlinux).map_err(Error::io("copy", &vmlinux))?;
        }

        let timer = StepTimer::start(Step::Initramfs, progress);
        initramfs::write(
            &out.join("initrd"),
            &inputs.busybox,
            &inputs.applets,
            &kernel_dir,
            &kernel,
        )?;
        timer.finish(false);

        let mut timer = StepTimer::start(Step::Pack, progress);
        rootfs::pack(
            &tree_dir,
            &spec.guest_binary,
            staging.path(),
            &out.join("rootfs.ext4"),
            spec.disk_size,
            &mut timer,
        )?;
        // The guest binary may have changed while it was being copied.
        if store::file_sha256(&spec.guest_binary)? != inputs.guest_sha256 {
            return Err(Error::ToolOutput {
                tool: "ember-guest".into(),
                reason: format!(
                    "{} changed during the build; run it again",
                    spec.guest_binary.display()
                ),
            });
        }
        timer.finish(false);

        let manifest = Manifest {
            format: FORMAT_VERSION,
            key: inputs.key.clone(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            kernel: KernelInfo {
                package: kernel.package.clone(),
                version: kernel.version.clone(),
                release: kernel.release.clone(),
            },
            modules: kernel.modules.iter().map(|m| m.name.clone()).collect(),
            suite: spec.suite.clone(),
            packages: inputs.packages.clone(),
            guest_sha256: inputs.guest_sha256.clone(),
            busybox_sha256: inputs.busybox_sha256.clone(),
            disk_size: spec.disk_size,
            kernel_args: DEFAULT_KERNEL_ARGS.into(),
            kernel_key: inputs.kernel_key.clone(),
            tree_key: inputs.tree_key.clone(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("Manifest serialises");
        write_durable(&out.join(MANIFEST), &json)?;
        // Confined VMMs read these through their jails as their own uids;
        // the data directory around them (0700) keeps other users out.
        for name in ["vmlinux", "initrd", "rootfs.ext4"] {
            use std::os::unix::fs::PermissionsExt;
            let path = out.join(name);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o444))
                .map_err(Error::io("chmod", &path))?;
        }
        staging.publish("image", &image_dir)?;
        store.set_current(&inputs.key)?;
        tracing::info!(key = %inputs.key, dir = %image_dir.display(), "guest image built");
        Image::open(&image_dir)
    }

    fn hit(store: &Store, image: Image, progress: &mut dyn FnMut(Progress)) -> Result<Image> {
        for step in [
            Step::Kernel,
            Step::Modules,
            Step::RootTree,
            Step::Initramfs,
            Step::Pack,
        ] {
            cached(step, progress);
        }
        store.set_current(&image.manifest.key)?;
        Ok(image)
    }

    /// The image `ensure` last returned under `data_dir`, without building
    /// or checking its inputs.
    pub fn locate(data_dir: &Path) -> Option<Image> {
        Image::open(&Store::existing(data_dir)?.current()?).ok()
    }

    /// The image in `dir`.
    pub fn open(dir: &Path) -> Result<Image> {
        let path = dir.join(MANIFEST);
        let text = fs::read(&path).map_err(Error::io("read", &path))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let image = Image {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            initrd: dir.join("initrd"),
            rootfs: dir.join("rootfs.ext4"),
            manifest,
        };
        for file in [&image.vmlinux, &image.initrd, &image.rootfs] {
            if !file.is_file() {
                return Err(Error::Manifest {
                    path,
                    reason: format!("{} is missing", file.display()),
                });
            }
        }
        Ok(image)
    }

    pub fn kernel_args(&self) -> &str {
        &self.manifest.kernel_args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_input_changes_exactly_the_layers_that_depend_on_it() {
        let kernel = KernelPackage {
            name: "linux-image-6.1.0-56-cloud-amd64".into(),
            version: "6.1.192-2".into(),
        };
        let packages = vec!["curl".to_owned(), "python3".to_owned()];
        let base = Keys::compute(&kernel, "bookworm", &packages, "g1", "b1", 1 << 30);
        assert_eq!(
            base,
            Keys::compute(&kernel, "bookworm", &packages, "g1", "b1", 1 << 30)
        );

        let guest = Keys::compute(&kernel, "bookworm", &packages, "g2", "b1", 1 << 30);
        assert_eq!(
            (guest.kernel == base.kernel, guest.tree == base.tree),
            (true, true)
        );
        assert_ne!(guest.image, base.image);

        let newer = KernelPackage {
            version: "6.1.193-1".into(),
            ..kernel.clone()
        };
        let k = Keys::compute(&newer, "bookworm", &packages, "g1", "b1", 1 << 30);
        assert_eq!(k.tree, base.tree);
        assert_ne!(k.kernel, base.kernel);
        assert_ne!(k.image, base.image);

        let more = vec!["curl".to_owned(), "git".to_owned(), "python3".to_owned()];
        let t = Keys::compute(&kernel, "bookworm", &more, "g1", "b1", 1 << 30);
        assert_eq!(t.kernel, base.kernel);
        assert_ne!(t.tree, base.tree);
        assert_ne!(t.image, base.image);
        let suite = Keys::compute(&kernel, "trixie", &packages, "g1", "b1", 1 << 30);
        assert_ne!(suite.tree, base.tree);

        for other in [
            Keys::compute(&kernel, "bookworm", &packages, "g1", "b2", 1 << 30),
            Keys::compute(&kernel, "bookworm", &packages, "g1", "b1", 2 << 30),
        ] {
            assert_eq!(
                (other.kernel == base.kernel, other.tree == base.tree),
                (true, true)
            );
            assert_ne!(other.image, base.image);
        }
    }

    #[test]
    fn data_dir_prefers_the_explicit_path() {
        assert_eq!(data_dir(Some(Path::new("/x"))), PathBuf::from("/x"));
    }

    #[test]
    fn a_missing_guest_binary_says_how_to_build_it() {
        let spec = ImageSpec::new("/nonexistent/ember-guest");
        let data = tempfile::tempdir().unwrap();
        let err = Inputs::resolve(&spec, &Store::open(data.path()).unwrap())
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/ember-guest") && msg.contains("cargo build -p ember-guest"),
            "{msg}"
        );
    }

    #[test]
    fn locate_finds_nothing_in_an_empty_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Image::locate(dir.path()), None);
    }
}

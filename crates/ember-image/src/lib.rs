//! Guest artifacts: the kernel Ember boots, the initramfs that brings up its
//! virtio drivers, the root filesystem, and the copy-on-write disks each
//! sandbox gets on top of it.
//!
//! [`Image::ensure`] builds (or finds in its cache) an image under Ember's
//! data directory:
//!
//! ```text
//! <data>/images/
//!   lock                 flock(2) held by whoever builds
//!   current -> <key>     the image `ensure` last returned
//!   <key>/               vmlinux, initrd, rootfs.ext4, manifest.json (immutable)
//!   kernel/<key>/        extracted kernel and modules, keyed by kernel package
//!   tree/<key>/          debootstrapped root tree, keyed by suite and packages
//!   tmp/                 work in progress; anything here is stale when the lock is free
//! ```
//!
//! Each layer is keyed by its own inputs, so a new `ember-guest` binary only
//! re-packs the ext4 image from the cached tree. Everything is built under
//! `tmp/` and renamed into place, so a crash never leaves a half-built entry
//! that looks valid.
//!
//! This crate runs host tools (`apt-get`, `dpkg-deb`, `depmod`, `debootstrap`,
//! `mkfs.ext4`, `qemu-img`) and blocks while they work: async callers run it
//! on a blocking thread. It does not launch VMs (`ember-vmm`) or decide which
//! overlays are still in use (`ember-agent`).

pub mod cow;
pub mod cpio;
pub mod elf;
mod error;
pub mod host;
mod image;
mod initramfs;
mod kernel;
pub mod layer;
pub mod lz4;
pub mod modules;
pub mod oci;
mod progress;
pub mod registry;
mod rootfs;
mod store;

pub use error::{Error, Result};
pub use image::{
    DEFAULT_DISK_SIZE, DEFAULT_KERNEL_PACKAGE, DEFAULT_PACKAGES, DEFAULT_SUITE, Image, ImageSpec,
    KernelInfo, Manifest, data_dir, default_guest_binary,
};
pub use kernel::extract_vmlinux;
pub use progress::{Progress, Step};

/// Kernel command line for Ember's guests, without the per-host part the
/// QEMU backend appends (`tsc_early_khz=`).
///
/// - `console=ttyS0`: the serial console is the boot log.
/// - `reboot=k panic=1`: a panicking guest reboots through the keyboard
///   controller after a second, which ends the VMM process instead of
///   leaving a hung VM.
/// - `quiet cryptomgr.notests`: printing and crypto self-tests dominate boot
///   time under TCG.
/// - `lsm=capability audit=0`: no security modules or audit to initialise;
///   the sandbox boundary is the VM.
/// - `pci=off`: virtio devices are on virtio-mmio, found through ACPI (which
///   therefore stays on).
/// - `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd`: skip probing a mouse
///   and multiplexer behind the keyboard controller, which Firecracker only
///   emulates for `reboot=k` (QEMU microvm has none; the probe is instant).
/// - `tsc=reliable`: without it the clocksource watchdog, comparing against
///   timer ticks that TCG delivers late, declares the TSC unstable a second
///   into boot and the guest falls back to jiffies (4 ms clock resolution).
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 quiet cryptomgr.notests \
lsm=capability audit=0 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable";

//! Guest artifacts: kernel extraction, root filesystem, initramfs, copy-on-write disks.

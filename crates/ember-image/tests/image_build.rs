//! A real image build into a fresh data directory: needs root, the build
//! tools and network access to the Debian mirror (several minutes cold).

mod common;

use std::path::Path;

use common::*;
use ember_image::cpio::{EntryKind, read_archive};
use ember_image::{Image, ImageSpec, Progress, Step};

#[test]
fn build_cold_then_hit_then_repack_root_network() {
    if let Some(reason) = build_precondition() {
        ember_testkit::report_skip(module_path!(), &reason);
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let guest = stand_in_guest(scratch.path(), "guest-a", "EMBER-A");
    let spec = ImageSpec::new(&guest);

    // Cold: every step runs.
    let Some((image, events, cold)) = ensure(data.path(), &spec) else {
        return;
    };
    for step in [
        Step::Kernel,
        Step::Modules,
        Step::RootTree,
        Step::Initramfs,
        Step::Pack,
    ] {
        assert!(!cached(&events, step), "{step:?} ran on a cold build");
    }
    check_kernel(&image);
    check_initrd(&image);
    check_rootfs(&image, &guest, scratch.path());
    assert_eq!(Image::locate(data.path()).as_ref(), Some(&image));
    let apparent = std::fs::metadata(&image.rootfs).unwrap().len();
    assert_eq!(apparent, ember_image::DEFAULT_DISK_SIZE);
    let used = on_disk(&image.rootfs);
    assert!(
        used < apparent / 2,
        "rootfs.ext4 is sparse: {used} of {apparent} bytes allocated"
    );

    // Hit: nothing is rebuilt, the same image comes back.
    let (again, events, hit) = ensure(data.path(), &spec).unwrap();
    assert_eq!(again, image);
    for step in [
        Step::Kernel,
        Step::Modules,
        Step::RootTree,
        Step::Initramfs,
        Step::Pack,
    ] {
        assert!(cached(&events, step), "{step:?} came from the cache");
    }

    // A new guest binary: re-pack from the cached tree, no debootstrap.
    let guest_b = stand_in_guest(scratch.path(), "guest-b", "EMBER-B");
    let spec_b = ImageSpec::new(&guest_b);
    let (image_b, events, repack) = ensure(data.path(), &spec_b).unwrap();
    assert!(cached(&events, Step::Kernel) && cached(&events, Step::RootTree));
    assert!(!cached(&events, Step::Pack));
    assert!(!events.iter().any(|e| matches!(
        e,
        Progress::Detail {
            step: Step::RootTree,
            ..
        }
    )));
    assert_ne!(image_b.dir, image.dir);
    assert_eq!(image_b.manifest.tree_key, image.manifest.tree_key);
    check_rootfs(&image_b, &guest_b, scratch.path());
    assert!(
        image.rootfs.is_file(),
        "the older image stays for overlays that use it"
    );
    check_rootfs(&image, &guest, scratch.path());
    assert_eq!(Image::locate(data.path()).unwrap().dir, image_b.dir);

    // Two concurrent builders of a third image: one builds, the other waits
    // and gets the same image. (flock contends between open files, so two
    // threads behave like two processes.)
    let guest_c = stand_in_guest(scratch.path(), "guest-c", "EMBER-C");
    let spec_c = ImageSpec::new(&guest_c);
    let both: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| ensure(data.path(), &spec_c).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(both[0].0, both[1].0);
    let packs = both
        .iter()
        .filter(|(_, events, _)| !cached(events, Step::Pack))
        .count();
    assert_eq!(packs, 1, "exactly one of the concurrent builders packed");
    assert!(
        std::fs::read_dir(data.path().join("images/tmp"))
            .unwrap()
            .next()
            .is_none()
    );

    eprintln!(
        "MEASURE cold build {:.1}s, cache hit {:.1}ms, re-pack (guest changed) {:.1}s; rootfs.ext4 {:.0} MiB apparent, {:.0} MiB on disk; vmlinux {:.1} MiB; initrd {:.2} MiB",
        cold.as_secs_f64(),
        hit.as_secs_f64() * 1000.0,
        repack.as_secs_f64(),
        mib(apparent),
        mib(used),
        mib(std::fs::metadata(&image.vmlinux).unwrap().len()),
        mib(std::fs::metadata(&image.initrd).unwrap().len()),
    );
}

fn check_kernel(image: &Image) {
    let vmlinux = std::fs::read(&image.vmlinux).unwrap();
    assert!(vmlinux.starts_with(b"\x7fELF"));
    let entry = ember_image::elf::pvh_entry(&vmlinux).unwrap();
    assert!(entry.is_some_and(|e| e > 0), "vmlinux has a PVH entry");
    assert!(image.manifest.kernel.package.starts_with("linux-image-"));
}

fn check_initrd(image: &Image) {
    let entries = read_archive(&std::fs::read(&image.initrd).unwrap()).unwrap();
    let get = |p: &str| entries.iter().find(|e| e.path == p).map(|e| &e.kind);
    let Some(EntryKind::File(init)) = get("init") else {
        panic!("no /init")
    };
    assert!(init.starts_with(b"#!/bin/sh"));
    let Some(EntryKind::File(busybox)) = get("bin/busybox") else {
        panic!("no busybox")
    };
    assert!(ember_image::elf::is_static(busybox).unwrap());
    assert!(matches!(
        get("dev/console"),
        Some(EntryKind::CharDevice { major: 5, minor: 1 })
    ));
    let Some(EntryKind::File(order)) = get("lib/modules/load-order") else {
        panic!("no load-order")
    };
    let order: Vec<_> = std::str::from_utf8(order)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let required = [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_blk",
    ];
    assert_eq!(&order[..7], required);
    for name in &order {
        let Some(EntryKind::File(ko)) = get(&format!("lib/modules/{name}.ko")) else {
            panic!("{name}.ko missing")
        };
        assert!(ko.starts_with(b"\x7fELF"), "{name}.ko is a module");
    }
    assert_eq!(image.manifest.modules, order);
}

fn check_rootfs(image: &Image, guest: &Path, scratch: &Path) {
    let rootfs = &image.rootfs;
    assert_eq!(
        ext4_read(rootfs, "/usr/sbin/init", scratch),
        std::fs::read(guest).unwrap()
    );
    assert!(
        debugfs(rootfs, "stat /sbin").contains("Type: symlink"),
        "/sbin -> usr/sbin"
    );
    let python = debugfs(rootfs, "stat /usr/bin/python3");
    assert!(
        python.contains("Type: symlink") || python.contains("Type: regular"),
        "{python}"
    );
    assert!(!python.contains("File not found"), "{python}");
    let home = debugfs(rootfs, "stat /home/user");
    assert!(
        home.contains("User:  1000") && home.contains("Type: directory"),
        "{home}"
    );
    let passwd = String::from_utf8(ext4_read(rootfs, "/etc/passwd", scratch)).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("user:x:1000:1000:")),
        "{passwd}"
    );
    assert_eq!(ext4_read(rootfs, "/etc/hostname", scratch), b"ember\n");
    assert_eq!(ext4_read(rootfs, "/etc/machine-id", scratch), b"");
    let doc = debugfs(rootfs, "ls /usr/share/doc/bash");
    assert!(
        doc.contains("copyright") && !doc.contains("changelog"),
        "documentation was left out: {doc}"
    );
    let lists = debugfs(rootfs, "ls -l /var/lib/apt/lists");
    assert!(
        !lists.contains("_Packages"),
        "apt lists were cleaned: {lists}"
    );
    let archives = debugfs(rootfs, "ls /var/cache/apt/archives");
    assert!(
        !archives.contains(".deb"),
        "downloaded packages were cleaned: {archives}"
    );
}

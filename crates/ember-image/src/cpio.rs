//! The `newc` cpio format (`070701`), which the kernel unpacks as an
//! initramfs: a writer for building one and a reader for checking one.
//!
//! Writing it here rather than with `cpio(1)` lets Ember add device nodes
//! (`/dev/console`) and set owners without root and without a staging tree,
//! and makes the archive reproducible (fixed inode numbers and mtimes).

use std::io::{self, Write};

use crate::Error;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
const S_IFMT: u32 = 0o170000;

/// Writes a newc archive entry by entry. Parents must be written before
/// their children; all entries are owned by root with mtime 0.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: usize,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Write the trailer and hand back the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 0, 1, (0, 0), 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        validate_path(path)?;
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio: {path} is larger than 4 GiB"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, mode, nlink, rdev, size)?;
        self.write_padded(data)
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: u32,
    ) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write_padded(&header)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        let pad = self.written.next_multiple_of(4) - self.written;
        self.out.write_all(&[0; 3][..pad])?;
        self.written += pad;
        Ok(())
    }
}

/// Entry names are relative paths without `.`/`..` components or NULs.
fn validate_path(path: &str) -> io::Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path == TRAILER
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpio: invalid entry name {path:?}"),
        ));
    }
    Ok(())
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
    Other { mode: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// Permission bits (the low 12 bits of the mode).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: EntryKind,
}

/// Parse a newc archive up to its trailer.
pub fn read_archive(data: &[u8]) -> Result<Vec<Entry>, Error> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        let err = |reason| Error::Cpio {
            offset: pos,
            reason,
        };
        let header = data
            .get(pos..pos + HEADER_LEN)
            .ok_or(err("truncated header"))?;
        if &header[..6] != MAGIC {
            return Err(err("bad magic (not newc)"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .map_err(|_| err("non-hex field"))?;
            *f = u32::from_str_radix(hex, 16).map_err(|_| err("non-hex field"))?;
        }
        let [
            _ino,
            mode,
            uid,
            gid,
            _nlink,
            _mtime,
            size,
            _maj,
            _min,
            rmaj,
            rmin,
            namesize,
            _check,
        ] = fields;
        let name_at = pos + HEADER_LEN;
        let name = data
            .get(name_at..name_at + namesize as usize)
            .and_then(|n| n.strip_suffix(b"\0"))
            .ok_or(err("truncated or unterminated name"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| err("name is not UTF-8"))?
            .to_owned();
        let data_at = (name_at + namesize as usize).next_multiple_of(4);
        if name == TRAILER {
            return Ok(entries);
        }
        let body = data
            .get(data_at..data_at + size as usize)
            .ok_or(err("truncated file data"))?;
        let kind = match mode & S_IFMT {
            S_IFDIR => EntryKind::Dir,
            S_IFREG => EntryKind::File(body.to_vec()),
            S_IFLNK => EntryKind::Symlink(
                String::from_utf8(body.to_vec()).map_err(|_| err("symlink target is not UTF-8"))?,
            ),
            S_IFCHR => EntryKind::CharDevice {
                major: rmaj,
                minor: rmin,
            },
            _ => EntryKind::Other { mode },
        };
        entries.push(Entry {
            path: name,
            perm: mode & 0o7777,
            uid,
            gid,
            kind,
        });
        pos = (data_at + size as usize).next_multiple_of(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF not really").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trips_through_the_reader() {
        let archive = sample();
        assert_eq!(archive.len() % 4, 0);
        let entries = read_archive(&archive).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "dev",
                "dev/console",
                "bin",
                "bin/busybox",
                "bin/sh",
                "init",
                "empty"
            ]
        );
        assert_eq!(
            entries[1].kind,
            EntryKind::CharDevice { major: 5, minor: 1 }
        );
        assert_eq!(entries[1].perm, 0o600);
        assert_eq!(
            entries[3].kind,
            EntryKind::File(b"\x7fELF not really".to_vec())
        );
        assert_eq!(entries[4].kind, EntryKind::Symlink("busybox".into()));
        assert_eq!(entries[5].perm, 0o755);
        assert_eq!(entries[6].kind, EntryKind::File(Vec::new()));
        assert!(entries.iter().all(|e| e.uid == 0 && e.gid == 0));
    }

    #[test]
    fn system_cpio_lists_and_extracts_it() {
        let Some(cpio) = ["/usr/bin/cpio", "/bin/cpio"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            ember_testkit::report_skip(
                module_path!(),
                "cpio(1) not installed: apt-get install cpio",
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample()).unwrap();
        let listed = std::process::Command::new(cpio)
            .args(["-t", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let names: Vec<_> = String::from_utf8(listed.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "bin",
                "bin/busybox",
                "bin/sh",
                "init",
                "empty"
            ]
        );
        // Extract the regular files and symlink (not the device) and compare contents.
        let out = dir.path().join("x");
        std::fs::create_dir(&out).unwrap();
        let extracted = std::process::Command::new(cpio)
            .current_dir(&out)
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .args(["init", "bin/*"])
            .output()
            .unwrap();
        assert!(
            extracted.status.success(),
            "{}",
            String::from_utf8_lossy(&extracted.stderr)
        );
        assert_eq!(
            std::fs::read(out.join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read_link(out.join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
    }

    #[test]
    fn rejects_unsafe_names() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/abs", "a/../b", "./x", "a//b", "TRAILER!!!", "nul\0"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reader_reports_truncation_instead_of_panicking() {
        let archive = sample();
        // The trailer's name ends 3 bytes before the archive does (padding).
        for cut in 0..archive.len() - 3 {
            // Every such prefix lacks a complete trailer, so it must be an error.
            assert!(read_archive(&archive[..cut]).is_err(), "cut at {cut}");
        }
    }
}

//! The little ELF reading Ember needs: does a kernel have a PVH entry point
//! (so Firecracker and QEMU microvm can boot it directly), and is a binary
//! statically linked (so it runs in an initramfs with no libc). Only 64-bit
//! little-endian files; every read is bounds-checked, so any input is safe.

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point for PVH boot.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

use crate::{Error, Result};

const NOT_ELF: &str = "not an ELF file";
const UNSUPPORTED: &str = "not a 64-bit little-endian ELF file";
const TRUNCATED: &str = "ELF file is truncated or its headers point outside it";

fn truncated() -> Error {
    Error::Elf { reason: TRUNCATED }
}

/// One program header, the fields Ember reads.
#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: u32,
    offset: u64,
    size: u64,
    align: u64,
}

fn read<const N: usize>(data: &[u8], at: u64) -> Result<[u8; N]> {
    let at = usize::try_from(at).map_err(|_| truncated())?;
    data.get(at..at.checked_add(N).ok_or_else(truncated)?)
        .map(|s| s.try_into().expect("slice of length N"))
        .ok_or_else(truncated)
}

fn u16_at(data: &[u8], at: u64) -> Result<u16> {
    read::<2>(data, at).map(u16::from_le_bytes)
}
fn u32_at(data: &[u8], at: u64) -> Result<u32> {
    read::<4>(data, at).map(u32::from_le_bytes)
}
fn u64_at(data: &[u8], at: u64) -> Result<u64> {
    read::<8>(data, at).map(u64::from_le_bytes)
}

fn segments(data: &[u8]) -> Result<Vec<Segment>> {
    if !data.starts_with(b"\x7fELF") {
        return Err(Error::Elf { reason: NOT_ELF });
    }
    // EI_CLASS = 2 (64-bit), EI_DATA = 1 (little-endian).
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err(Error::Elf {
            reason: UNSUPPORTED,
        });
    }
    let phoff = u64_at(data, 0x20)?;
    let phentsize = u64::from(u16_at(data, 0x36)?);
    let phnum = u64::from(u16_at(data, 0x38)?);
    if phnum > 0 && phentsize < 56 {
        return Err(truncated());
    }
    (0..phnum)
        .map(|i| {
            let at = phoff.checked_add(i * phentsize).ok_or_else(truncated)?;
            Ok(Segment {
                kind: u32_at(data, at)?,
                offset: u64_at(data, at.saturating_add(8))?,
                size: u64_at(data, at.saturating_add(32))?,
                align: u64_at(data, at.saturating_add(48))?,
            })
        })
        .collect()
}

/// An ELF note: its owner's name (without the NUL), type and descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

/// All notes in the file's `PT_NOTE` segments.
pub fn notes(data: &[u8]) -> Result<Vec<Note<'_>>> {
    let mut notes = Vec::new();
    for seg in segments(data)?.into_iter().filter(|s| s.kind == PT_NOTE) {
        let start = usize::try_from(seg.offset).map_err(|_| truncated())?;
        let len = usize::try_from(seg.size).map_err(|_| truncated())?;
        let body = data
            .get(start..start.checked_add(len).ok_or_else(truncated)?)
            .ok_or_else(truncated)?;
        // Notes are 4-byte aligned, except in segments declared 8-aligned.
        let align = if seg.align == 8 { 8 } else { 4 };
        let pad = |n: usize| n.div_ceil(align) * align;
        let mut pos = 0usize;
        while pos + 12 <= body.len() {
            let namesz = u32_at(body, pos as u64)? as usize;
            let descsz = u32_at(body, pos as u64 + 4)? as usize;
            let kind = u32_at(body, pos as u64 + 8)?;
            let name_at = pos + 12;
            let desc_at = name_at.checked_add(pad(namesz)).ok_or_else(truncated)?;
            let end = desc_at.checked_add(pad(descsz)).ok_or_else(truncated)?;
            let name = body.get(name_at..name_at + namesz).ok_or_else(truncated)?;
            let desc = body.get(desc_at..desc_at + descsz).ok_or_else(truncated)?;
            notes.push(Note {
                name: name.strip_suffix(b"\0").unwrap_or(name),
                kind,
                desc,
            });
            pos = end;
        }
    }
    Ok(notes)
}

/// The PVH entry point of a kernel (`XEN_ELFNOTE_PHYS32_ENTRY`), or `None`
/// if it has none.
pub fn pvh_entry(data: &[u8]) -> Result<Option<u64>> {
    Ok(notes(data)?
        .into_iter()
        .find(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
        .and_then(|n| match n.desc.len() {
            4 => Some(u64::from(u32::from_le_bytes(n.desc.try_into().ok()?))),
            8 => Some(u64::from_le_bytes(n.desc.try_into().ok()?)),
            _ => None,
        }))
}

/// Whether an executable runs without a dynamic loader (no `PT_INTERP`).
pub fn is_static(data: &[u8]) -> Result<bool> {
    Ok(!segments(data)?.iter().any(|s| s.kind == PT_INTERP))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 file: a header, the given program headers and, after
    /// them, the given segment bodies (offsets filled in).
    pub(crate) fn elf_with_segments(segs: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // 64-bit
        out[5] = 1; // little-endian
        out[6] = 1; // version
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let mut body_at = 64 + 56 * segs.len();
        let mut bodies = Vec::new();
        for (kind, body) in segs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&(body_at as u64).to_le_bytes());
            ph[32..40].copy_from_slice(&(body.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&(body.len() as u64).to_le_bytes());
            ph[48..56].copy_from_slice(&4u64.to_le_bytes());
            out.extend_from_slice(&ph);
            body_at += body.len();
            bodies.extend_from_slice(body);
        }
        out.extend_from_slice(&bodies);
        out
    }

    pub(crate) fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(name);
        out.push(0);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out.extend_from_slice(desc);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out
    }

    /// A kernel-like ELF with a GNU build-id note and the PVH note.
    pub(crate) fn pvh_kernel(entry: u64) -> Vec<u8> {
        let mut notes = note(b"GNU", 3, &[0xab; 20]);
        notes.extend(note(b"Xen", 6, b"linux"));
        notes.extend(note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, &entry.to_le_bytes()));
        elf_with_segments(&[(1, vec![0x90; 32]), (PT_NOTE, notes)])
    }

    #[test]
    fn finds_the_pvh_entry_among_other_notes() {
        assert_eq!(
            pvh_entry(&pvh_kernel(0x0100_02a0)).unwrap(),
            Some(0x0100_02a0)
        );
    }

    #[test]
    fn accepts_a_32_bit_descriptor() {
        let elf = elf_with_segments(&[(PT_NOTE, note(b"Xen", 18, &0x1234u32.to_le_bytes()))]);
        assert_eq!(pvh_entry(&elf).unwrap(), Some(0x1234));
    }

    #[test]
    fn kernel_without_pvh_note_has_no_entry() {
        let elf = elf_with_segments(&[(PT_NOTE, note(b"Xen", 6, b"linux"))]);
        assert_eq!(pvh_entry(&elf).unwrap(), None);
        // The right type from another owner is not a PVH note.
        let elf = elf_with_segments(&[(PT_NOTE, note(b"GNU", 18, &[1, 0, 0, 0]))]);
        assert_eq!(pvh_entry(&elf).unwrap(), None);
    }

    #[test]
    fn static_means_no_interpreter() {
        assert!(is_static(&elf_with_segments(&[(1, vec![0; 8])])).unwrap());
        let dynamic = elf_with_segments(&[(PT_INTERP, b"/lib64/ld-linux-x86-64.so.2\0".to_vec())]);
        assert!(!is_static(&dynamic).unwrap());
    }

    #[test]
    fn rejects_non_elf_and_truncated_input() {
        assert!(matches!(
            pvh_entry(b"MZ\x90\x00"),
            Err(Error::Elf { reason: NOT_ELF })
        ));
        let mut elf32 = pvh_kernel(1);
        elf32[4] = 1;
        assert!(matches!(
            pvh_entry(&elf32),
            Err(Error::Elf {
                reason: UNSUPPORTED
            })
        ));
        let full = pvh_kernel(1);
        for cut in [10, 64, 100, full.len() - 3] {
            assert!(pvh_entry(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400), corrupt_from in 0usize..400) {
            let mut elf = pvh_kernel(0x1000);
            let n = data.len().min(elf.len().saturating_sub(corrupt_from));
            let from = corrupt_from.min(elf.len());
            elf[from..][..n].copy_from_slice(&data[..n]);
            let _ = pvh_entry(&elf);
            let _ = is_static(&elf);
        }
    }
}

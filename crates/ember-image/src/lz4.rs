//! Decoder for LZ4's *legacy* frame format, the one Linux's build uses for an
//! LZ4-compressed kernel (`lz4 -l`). Only decoding; compressing is the
//! kernel build's business.
//!
//! A legacy frame is the magic `02 21 4c 18` followed by blocks, each a
//! little-endian `u32` compressed size and that many bytes of a raw LZ4
//! block. Every block but the last decompresses to exactly 8 MiB. There is
//! no end marker: the stream ends at end of input, at the magic of a
//! following frame (which continues the stream), or at bytes that cannot be
//! a block size. The kernel appends its uncompressed size (4 bytes) and a
//! signed kernel also carries a signature after the payload, so the decoder
//! must stop at such trailing data rather than fail on it.

/// The legacy frame magic as it appears in a file.
pub const LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

/// Uncompressed size of every legacy block except the last.
pub const LEGACY_BLOCK_SIZE: usize = 8 << 20;

/// The largest compressed size a legacy block can have (LZ4's worst-case
/// expansion of an 8 MiB block).
const MAX_COMPRESSED_BLOCK: usize = LEGACY_BLOCK_SIZE + LEGACY_BLOCK_SIZE / 255 + 16;

use crate::{Error, Result};

/// What [`decompress_legacy`] produced.
#[derive(Debug)]
pub struct Decoded {
    pub data: Vec<u8>,
    /// Bytes of the input that belonged to the stream; what follows is
    /// trailing data the decoder did not interpret.
    pub consumed: usize,
}

/// Decode a legacy LZ4 stream (one or more concatenated frames) from the
/// start of `input`, stopping at the first bytes that are not a block.
pub fn decompress_legacy(input: &[u8]) -> Result<Decoded> {
    if !input.starts_with(&LEGACY_MAGIC) {
        return Err(Error::NotLz4Legacy);
    }
    let magic = u32::from_le_bytes(LEGACY_MAGIC);
    let mut out = Vec::new();
    let mut block = vec![0u8; LEGACY_BLOCK_SIZE];
    let mut pos = LEGACY_MAGIC.len();
    // After a short block the frame is over; only a new frame may follow.
    let mut frame_ended = false;
    while let Some(field) = input.get(pos..pos + 4) {
        let size = u32::from_le_bytes(field.try_into().expect("4-byte slice"));
        if size == magic {
            pos += 4;
            frame_ended = false;
            continue;
        }
        let size = size as usize;
        let remaining = input.len() - pos - 4;
        if frame_ended || size == 0 || size > MAX_COMPRESSED_BLOCK || size > remaining {
            break;
        }
        let compressed = &input[pos + 4..pos + 4 + size];
        let n = lz4_flex::block::decompress_into(compressed, &mut block).map_err(|source| {
            Error::Lz4Block {
                offset: pos,
                source,
            }
        })?;
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
        frame_ended = n < LEGACY_BLOCK_SIZE;
    }
    Ok(Decoded {
        data: out,
        consumed: pos,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Compress `data` the way `lz4 -l` does: one frame of 8 MiB blocks.
    pub(crate) fn compress_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(LEGACY_BLOCK_SIZE) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    /// Data that compresses, but not to nothing: a counter mixed with text.
    fn sample(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_u32;
        (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                if i % 7 == 0 {
                    (state >> 24) as u8
                } else {
                    b"ember microvm "[i % 14]
                }
            })
            .collect()
    }

    #[test]
    fn single_short_block() {
        let data = sample(100_000);
        let stream = compress_legacy(&data);
        let decoded = decompress_legacy(&stream).unwrap();
        assert_eq!(decoded.data, data);
        assert_eq!(decoded.consumed, stream.len());
    }

    #[test]
    fn multi_block_with_kernel_size_trailer_and_signature() {
        // Two full 8 MiB blocks and a partial one, like a real kernel payload.
        let data = sample(2 * LEGACY_BLOCK_SIZE + 12345);
        let mut stream = compress_legacy(&data);
        let end = stream.len();
        stream.extend_from_slice(&(data.len() as u32).to_le_bytes());
        stream.extend_from_slice(b"~Module signature appended~\n and more junk");
        let decoded = decompress_legacy(&stream).unwrap();
        assert_eq!(decoded.data.len(), data.len());
        assert!(decoded.data == data);
        assert_eq!(decoded.consumed, end);
    }

    #[test]
    fn exact_multiple_of_block_size_then_trailer() {
        let data = sample(LEGACY_BLOCK_SIZE);
        let mut stream = compress_legacy(&data);
        let end = stream.len();
        // A small trailer value that could pass for a block size if it fit.
        stream.extend_from_slice(&7u32.to_le_bytes());
        stream.extend_from_slice(&[0xff; 3]);
        let decoded = decompress_legacy(&stream).unwrap();
        assert!(decoded.data == data);
        assert_eq!(decoded.consumed, end);
    }

    #[test]
    fn concatenated_frames_continue_the_stream() {
        let a = sample(5000);
        let b = sample(7000);
        let mut stream = compress_legacy(&a);
        stream.extend_from_slice(&compress_legacy(&b));
        let decoded = decompress_legacy(&stream).unwrap();
        assert_eq!(decoded.data, [a, b].concat());
        assert_eq!(decoded.consumed, stream.len());
    }

    #[test]
    fn data_after_a_short_block_is_trailing_even_if_it_fits() {
        let data = sample(3000);
        let mut stream = compress_legacy(&data);
        let end = stream.len();
        // Looks like a block of 4 bytes, but a short block already ended the frame.
        stream.extend_from_slice(&4u32.to_le_bytes());
        stream.extend_from_slice(&[0x40, 0x41, 0x42, 0x43]);
        let decoded = decompress_legacy(&stream).unwrap();
        assert_eq!(decoded.data, data);
        assert_eq!(decoded.consumed, end);
    }

    #[test]
    fn rejects_other_formats_and_corrupt_blocks() {
        assert!(matches!(
            decompress_legacy(b"\x04\x22\x4d\x18rest"),
            Err(Error::NotLz4Legacy)
        ));
        assert!(matches!(decompress_legacy(&[]), Err(Error::NotLz4Legacy)));
        let mut stream = LEGACY_MAGIC.to_vec();
        stream.extend_from_slice(&8u32.to_le_bytes());
        // A match offset pointing before the start of the output.
        stream.extend_from_slice(&[0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            decompress_legacy(&stream),
            Err(Error::Lz4Block { offset: 4, .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_garbage_after_the_magic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut stream = LEGACY_MAGIC.to_vec();
            stream.extend_from_slice(&tail);
            let _ = decompress_legacy(&stream);
        }

        #[test]
        fn round_trips(data in proptest::collection::vec(proptest::num::u8::ANY, 0..20_000)) {
            let decoded = decompress_legacy(&compress_legacy(&data)).unwrap();
            proptest::prop_assert_eq!(decoded.data, data);
        }
    }
}

//! Process events and their NDJSON framing: one JSON object per line, each
//! ending in `\n` (the format is specified in the crate docs). Both the agent
//! (encoding) and the client (decoding) use this module, so they cannot drift.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::GuestError;
use crate::wire::{ProcessExit, base64_bytes};

/// What happened to a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProcessEvent {
    /// The process is running with this pid (always the first event).
    Start { pid: u32 },
    /// Bytes it wrote to stdout (or to its PTY).
    Stdout {
        #[serde(with = "base64_bytes")]
        data: Bytes,
    },
    /// Bytes it wrote to stderr.
    Stderr {
        #[serde(with = "base64_bytes")]
        data: Bytes,
    },
    /// It ended (always the last event).
    Exit(ProcessExit),
    /// Events `first_seq..=seq` (this record's `seq`) fell out of the agent's
    /// buffer before this reader asked for them.
    Lost { first_seq: u64 },
    /// An event type this crate does not know (from a newer agent).
    #[serde(other)]
    Unknown,
}

/// One line of an event stream: the event with its per-process sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub event: ProcessEvent,
}

/// One NDJSON line for `record`, newline included.
pub fn encode_event_line(record: &EventRecord) -> Bytes {
    let mut line = serde_json::to_vec(record).expect("event records always serialise");
    line.push(b'\n');
    Bytes::from(line)
}

/// Splits a byte stream into [`EventRecord`]s, whatever the chunking.
#[derive(Debug)]
pub struct NdjsonDecoder {
    buf: BytesMut,
    max_line: usize,
}

impl Default for NdjsonDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl NdjsonDecoder {
    /// Lines longer than this are refused rather than buffered without end.
    pub const DEFAULT_MAX_LINE: usize = 16 << 20;

    pub fn new() -> Self {
        Self::with_max_line(Self::DEFAULT_MAX_LINE)
    }

    pub fn with_max_line(max_line: usize) -> Self {
        NdjsonDecoder {
            buf: BytesMut::new(),
            max_line,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete record, `None` when more bytes are needed. Empty
    /// lines are skipped.
    pub fn next_record(&mut self) -> Result<Option<EventRecord>, GuestError> {
        self.next_line()
    }

    /// The next complete line as a `T` (any NDJSON stream's records).
    pub fn next_line<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, GuestError> {
        loop {
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > self.max_line {
                    return Err(malformed(format!(
                        "event line longer than {} bytes",
                        self.max_line
                    )));
                }
                return Ok(None);
            };
            let line = self.buf.split_to(end);
            self.buf.advance(1);
            let line = trim_cr(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(line)
                .map(Some)
                .map_err(|e| malformed(format!("bad event line: {e}")));
        }
    }

    /// Call at the end of the stream: a partial line left over is an error.
    pub fn finish(&self) -> Result<(), GuestError> {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            Ok(())
        } else {
            Err(malformed(format!(
                "event stream ended inside a line ({} bytes)",
                self.buf.len()
            )))
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn malformed(detail: String) -> GuestError {
    GuestError::Malformed {
        operation: "process events",
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<EventRecord> {
        vec![
            EventRecord {
                seq: 1,
                event: ProcessEvent::Start { pid: 42 },
            },
            EventRecord {
                seq: 2,
                event: ProcessEvent::Stdout {
                    data: Bytes::from_static(b"hello\n"),
                },
            },
            EventRecord {
                seq: 3,
                event: ProcessEvent::Stderr {
                    data: Bytes::from_static(b"\x00\xffbinary"),
                },
            },
            EventRecord {
                seq: 9,
                event: ProcessEvent::Lost { first_seq: 4 },
            },
            EventRecord {
                seq: 10,
                event: ProcessEvent::Exit(ProcessExit {
                    exit_code: None,
                    signal: Some(9),
                    core_dumped: false,
                    timed_out: true,
                }),
            },
        ]
    }

    #[test]
    fn wire_shape_is_the_documented_one() {
        let lines: Vec<String> = sample()
            .iter()
            .map(|r| String::from_utf8(encode_event_line(r).to_vec()).unwrap())
            .collect();
        assert_eq!(lines[0], "{\"seq\":1,\"type\":\"start\",\"pid\":42}\n");
        assert_eq!(
            lines[1],
            "{\"seq\":2,\"type\":\"stdout\",\"data\":\"aGVsbG8K\"}\n"
        );
        assert_eq!(lines[3], "{\"seq\":9,\"type\":\"lost\",\"first_seq\":4}\n");
        assert_eq!(
            lines[4],
            "{\"seq\":10,\"type\":\"exit\",\"exit_code\":null,\"signal\":9,\"core_dumped\":false,\"timed_out\":true}\n"
        );
    }

    #[test]
    fn unknown_event_types_and_fields_decode() {
        let mut d = NdjsonDecoder::new();
        d.push(b"{\"seq\":5,\"type\":\"cpu_usage\",\"percent\":12}\n");
        d.push(b"{\"seq\":6,\"type\":\"start\",\"pid\":3,\"cgroup\":\"x\"}\n");
        assert_eq!(
            d.next_record().unwrap().unwrap(),
            EventRecord {
                seq: 5,
                event: ProcessEvent::Unknown
            }
        );
        assert_eq!(
            d.next_record().unwrap().unwrap().event,
            ProcessEvent::Start { pid: 3 }
        );
        assert!(d.next_record().unwrap().is_none());
        d.finish().unwrap();
    }

    #[test]
    fn empty_and_crlf_lines_are_tolerated() {
        let mut d = NdjsonDecoder::new();
        d.push(b"\n\r\n{\"seq\":1,\"type\":\"start\",\"pid\":1}\r\n\n");
        assert_eq!(d.next_record().unwrap().unwrap().seq, 1);
        assert!(d.next_record().unwrap().is_none());
    }

    #[test]
    fn garbage_and_truncation_are_malformed() {
        let mut d = NdjsonDecoder::new();
        d.push(b"not json\n");
        assert!(matches!(d.next_record(), Err(GuestError::Malformed { .. })));
        let mut d = NdjsonDecoder::new();
        d.push(b"{\"seq\":1,\"type\":\"sta");
        assert!(d.next_record().unwrap().is_none());
        assert!(d.finish().is_err());
        let mut d = NdjsonDecoder::with_max_line(8);
        d.push(b"0123456789");
        assert!(d.next_record().is_err());
    }

    proptest! {
        #[test]
        fn any_chunking_decodes_to_the_same_records(
            cuts in proptest::collection::vec(0usize..400, 0..12),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut records = sample();
            records.push(EventRecord { seq: 11, event: ProcessEvent::Stdout { data: Bytes::from(payload) } });
            let wire: Vec<u8> = records.iter().flat_map(|r| encode_event_line(r).to_vec()).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.push(0);
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut d = NdjsonDecoder::new();
            let mut got = Vec::new();
            for pair in cuts.windows(2) {
                d.push(&wire[pair[0]..pair[1]]);
                while let Some(r) = d.next_record().unwrap() {
                    got.push(r);
                }
            }
            d.finish().unwrap();
            prop_assert_eq!(got, records);
        }
    }
}

//! The bounded, sequence-numbered buffer of one process's events, and the
//! accounting that lets an attached reader hold the output back instead of
//! losing it.
//!
//! Each event costs its data length plus [`EVENT_OVERHEAD`]. The log keeps at
//! most `limit` bytes of events a reader no longer needs; older ones are
//! evicted and readers who wanted them get a `lost` event. While readers are
//! attached, [`EventLog::has_room`] turns false once the slowest one is
//! `limit` bytes behind, and the process's output readers wait for it.
//! This module does no I/O and knows nothing of processes.

use std::collections::{HashMap, VecDeque};

use ember_guest_api::{EventRecord, ProcessEvent};

/// Bookkeeping cost charged per event, so that floods of tiny events are bounded too.
pub const EVENT_OVERHEAD: u64 = 64;

#[derive(Debug)]
struct Stored {
    record: EventRecord,
    /// Cumulative cost of all events up to and including this one.
    end_offset: u64,
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// The last `seq` this reader has been given.
    seq: u64,
    /// Cumulative cost of what it has been given.
    offset: u64,
}

#[derive(Debug)]
pub struct EventLog {
    events: VecDeque<Stored>,
    limit: u64,
    next_seq: u64,
    appended: u64,
    readers: HashMap<u64, Cursor>,
    next_reader: u64,
    finished: bool,
}

fn cost(event: &ProcessEvent) -> u64 {
    EVENT_OVERHEAD
        + match event {
            ProcessEvent::Stdout { data } | ProcessEvent::Stderr { data } => data.len() as u64,
            _ => 0,
        }
}

impl EventLog {
    pub fn new(limit: usize) -> Self {
        EventLog {
            events: VecDeque::new(),
            limit: limit.max(1) as u64,
            next_seq: 1,
            appended: 0,
            readers: HashMap::new(),
            next_reader: 0,
            finished: false,
        }
    }

    /// Appends `event` and returns its `seq`. An `exit` finishes the log.
    pub fn append(&mut self, event: ProcessEvent) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.appended += cost(&event);
        if matches!(event, ProcessEvent::Exit(_)) {
            self.finished = true;
        }
        self.events.push_back(Stored {
            record: EventRecord { seq, event },
            end_offset: self.appended,
        });
        self.evict();
        seq
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Total cost appended so far: output readers watch it to see progress.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Cost of the events held now.
    pub fn retained(&self) -> u64 {
        match self.events.front() {
            Some(front) => self.appended - (front.end_offset - cost(&front.record.event)),
            None => 0,
        }
    }

    fn slowest_reader_offset(&self) -> Option<u64> {
        self.readers.values().map(|c| c.offset).min()
    }

    fn evict(&mut self) {
        let protected = self.slowest_reader_offset();
        while self.events.len() > 1 && self.retained() > self.limit {
            let front = &self.events[0];
            if protected.is_some_and(|o| front.end_offset > o) {
                break;
            }
            self.events.pop_front();
        }
    }

    /// Whether more output may be appended without leaving an attached
    /// reader more than `limit` behind. Always true with no reader attached.
    pub fn has_room(&self) -> bool {
        match self.slowest_reader_offset() {
            Some(offset) => self.appended - offset < self.limit,
            None => true,
        }
    }

    /// Attaches a reader that wants the events after `after`.
    pub fn attach(&mut self, after: u64) -> u64 {
        let after = after.min(self.last_seq());
        let offset = match self.events.iter().find(|s| s.record.seq > after) {
            Some(next) => next.end_offset - cost(&next.record.event),
            None => self.appended,
        };
        let id = self.next_reader;
        self.next_reader += 1;
        self.readers.insert(id, Cursor { seq: after, offset });
        id
    }

    pub fn detach(&mut self, reader: u64) {
        self.readers.remove(&reader);
        self.evict();
    }

    /// The next events for `reader`, at most about `max_bytes` of them (at
    /// least one), starting with a `lost` record when the buffer no longer
    /// holds what it asked for. Empty when it has everything so far.
    pub fn read(&mut self, reader: u64, max_bytes: u64) -> Vec<EventRecord> {
        let Some(mut cursor) = self.readers.get(&reader).copied() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let first_held = self.events.front().map_or(self.next_seq, |s| s.record.seq);
        if cursor.seq + 1 < first_held {
            out.push(EventRecord {
                seq: first_held - 1,
                event: ProcessEvent::Lost {
                    first_seq: cursor.seq + 1,
                },
            });
            cursor.seq = first_held - 1;
        }
        let start = (cursor.seq + 1 - first_held) as usize;
        let mut taken = 0;
        for stored in self.events.iter().skip(start) {
            if taken >= max_bytes && !out.is_empty() {
                break;
            }
            taken += cost(&stored.record.event);
            cursor.seq = stored.record.seq;
            cursor.offset = stored.end_offset;
            out.push(stored.record.clone());
        }
        self.readers.insert(reader, cursor);
        self.evict();
        out
    }

    /// Whether `reader` has been given everything, exit included.
    pub fn done_for(&self, reader: u64) -> bool {
        self.finished
            && self
                .readers
                .get(&reader)
                .is_none_or(|c| c.seq >= self.last_seq())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ember_guest_api::ProcessExit;

    fn out(n: usize) -> ProcessEvent {
        ProcessEvent::Stdout {
            data: Bytes::from(vec![b'x'; n]),
        }
    }

    fn seqs(records: &[EventRecord]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn unattached_log_evicts_oldest_and_reports_the_gap() {
        let mut log = EventLog::new(1000);
        log.append(ProcessEvent::Start { pid: 1 });
        for _ in 0..20 {
            assert!(log.has_room(), "no reader attached: never blocks");
            log.append(out(100));
        }
        log.append(ProcessEvent::Exit(ProcessExit::default()));
        let r = log.attach(0);
        let got = log.read(r, u64::MAX);
        let ProcessEvent::Lost { first_seq } = got[0].event else {
            panic!("expected lost first, got {:?}", got[0]);
        };
        assert_eq!(first_seq, 1);
        // Sequence numbers stay contiguous across the gap.
        let s = seqs(&got);
        for pair in s.windows(2) {
            assert_eq!(pair[1], pair[0] + 1);
        }
        assert_eq!(*s.last().unwrap(), 22);
        assert!(log.done_for(r));
        let kept: u64 = got[1..].iter().map(|r| cost(&r.event)).sum();
        assert!(kept <= 1000, "kept {kept}");
    }

    #[test]
    fn attached_reader_blocks_the_writer_instead_of_losing_output() {
        let mut log = EventLog::new(1000);
        log.append(ProcessEvent::Start { pid: 1 });
        let r = log.attach(0);
        let mut appended = 0;
        while log.has_room() {
            log.append(out(100));
            appended += 1;
        }
        assert!(
            appended < 10,
            "must stop near the limit, appended {appended}"
        );
        let got = log.read(r, u64::MAX);
        assert_eq!(got.len(), appended + 1);
        assert!(
            got.iter()
                .all(|r| !matches!(r.event, ProcessEvent::Lost { .. }))
        );
        assert!(log.has_room(), "reader caught up");
        log.detach(r);
        assert!(log.has_room());
    }

    #[test]
    fn replay_from_the_middle_and_batches() {
        let mut log = EventLog::new(1 << 20);
        log.append(ProcessEvent::Start { pid: 1 });
        for _ in 0..5 {
            log.append(out(10));
        }
        let r = log.attach(3);
        assert_eq!(seqs(&log.read(r, 1)), [4]);
        assert_eq!(seqs(&log.read(r, u64::MAX)), [5, 6]);
        assert!(log.read(r, u64::MAX).is_empty());
        assert!(!log.done_for(r));
        log.append(ProcessEvent::Exit(ProcessExit::default()));
        assert_eq!(seqs(&log.read(r, u64::MAX)), [7]);
        assert!(log.done_for(r));
        // Asking beyond the end is asking for what comes next.
        let late = log.attach(99);
        assert!(log.read(late, u64::MAX).is_empty());
        assert!(log.done_for(late));
    }
}

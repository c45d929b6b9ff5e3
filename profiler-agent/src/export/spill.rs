//! Spilling unacknowledged batches to disk while the collector is away, so
//! an outage longer than the memory queue loses nothing until the spill cap.
//!
//! One file per batch, named by a sequence that orders them oldest first:
//! `MAGIC`, payload length (u32 LE), CRC-32 of the payload (u32 LE), then the
//! protobuf-encoded batch. Files are written to a temporary name, synced and
//! renamed, so a crash leaves whole records or none. A record that fails its
//! checksum is deleted and counted, and the rest replays. Files left by an
//! earlier run are replayed too (the collector de-duplicates re-sends).
//!
//! Memory stays small whatever the outage: the index holds 24 bytes a
//! record, at most [`MAX_RECORDS`] records, and one record is read at a time.
use std::{
    collections::VecDeque,
    fs::File,
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use profiler_proto::v1::Batch;
use prost::Message;

use super::{
    batch::batch_samples,
    stats::{DropReason, ExportStats, SpillStats},
};
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"PBAT01";
const HEADER: usize = MAGIC.len() + 8;
const SUFFIX: &str = "batch";
/// Most records kept (past it the oldest are dropped like over the cap):
/// bounds the index in memory when batches are tiny.
pub const MAX_RECORDS: usize = 100_000;

/// One record on disk: `{seq:020}.batch`.
#[derive(Clone, Copy, Debug)]
struct Record {
    seq: u64,
    size: u64,
    /// Samples in it; `None` for records of an earlier run (read when dropped).
    samples: Option<u64>,
}

/// Batches on disk, oldest first.
pub struct Spill {
    dir: PathBuf,
    cap_bytes: u64,
    files: VecDeque<Record>,
    bytes: u64,
    next: u64,
    /// Records were dropped at the cap since the spill was last empty (the
    /// log says so once).
    capped: bool,
}

fn encode_record(batch: &Batch) -> Vec<u8> {
    let payload = batch.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a record; `None` if it is truncated, altered or not a batch.
fn decode_record(bytes: &[u8]) -> Option<Batch> {
    let header = bytes.get(..HEADER)?;
    if &header[..MAGIC.len()] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[6..10].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[10..14].try_into().ok()?);
    let payload = bytes.get(HEADER..)?;
    if payload.len() != len || crc32fast::hash(payload) != crc {
        return None;
    }
    Batch::decode(payload).ok()
}

impl Spill {
    /// Opens (creating) the spill directory and finds records left there.
    pub fn open(dir: &Path, cap_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating the spill directory {}", dir.display()), e))?;
        let mut files: Vec<Record> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == SUFFIX))
            .filter_map(|p| {
                let seq = p.file_stem()?.to_str()?.parse::<u64>().ok()?;
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                Some(Record {
                    seq,
                    size,
                    samples: None,
                })
            })
            .collect();
        files.sort_by_key(|r| r.seq);
        let next = files.last().map_or(0, |r| r.seq + 1);
        let bytes = files.iter().map(|r| r.size).sum();
        if !files.is_empty() {
            tracing::info!(
                records = files.len(),
                bytes,
                "spilled batches found: replaying them"
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            cap_bytes,
            files: files.into(),
            bytes,
            next,
            capped: false,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{SUFFIX}"))
    }

    /// Updates the gauges.
    pub fn publish(&self, stats: &SpillStats) {
        stats
            .records
            .store(self.files.len() as u64, Ordering::Relaxed);
        stats.bytes.store(self.bytes, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes a batch as the newest record; deletes the oldest records while
    /// over the cap.
    pub fn push(&mut self, batch: &Batch, stats: &ExportStats) {
        let record = encode_record(batch);
        let samples = batch_samples(batch);
        let path = self.path(self.next);
        let tmp = self.dir.join(format!("{:020}.tmp", self.next));
        let written = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&record)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            stats.count_drop(DropReason::SpillWriteError, 1, samples);
            tracing::warn!(
                samples,
                "could not spill a batch to {}: {e}",
                self.dir.display()
            );
            return;
        }
        self.files.push_back(Record {
            seq: self.next,
            size: record.len() as u64,
            samples: Some(samples),
        });
        self.next += 1;
        self.bytes += record.len() as u64;
        stats.spill.spilled.fetch_add(1, Ordering::Relaxed);
        while (self.bytes > self.cap_bytes || self.files.len() > MAX_RECORDS)
            && self.files.len() > 1
        {
            let dropped = self.files.front().copied();
            let samples =
                dropped.map_or(0, |r| r.samples.unwrap_or_else(|| self.samples_of(r.seq)));
            self.pop();
            stats.count_drop(DropReason::SpillCap, 1, samples);
            if !self.capped {
                self.capped = true;
                tracing::warn!(
                    cap_bytes = self.cap_bytes,
                    "spill directory full: dropping the oldest batches (counted)"
                );
            } else {
                tracing::debug!(samples, "spill directory full: dropped the oldest batch");
            }
        }
    }

    /// Samples of a record of an earlier run (0 if it cannot be read).
    fn samples_of(&self, seq: u64) -> u64 {
        std::fs::read(self.path(seq))
            .ok()
            .and_then(|bytes| decode_record(&bytes))
            .map_or(0, |b| batch_samples(&b))
    }

    /// The oldest valid record; corrupt ones on the way are deleted and counted.
    pub fn front(&mut self, stats: &ExportStats) -> Option<Batch> {
        while let Some(record) = self.files.front() {
            let path = self.path(record.seq);
            let mut bytes = Vec::new();
            let read = File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes));
            match read.ok().and_then(|_| decode_record(&bytes)) {
                Some(batch) => return Some(batch),
                None => {
                    tracing::warn!("spilled record {} is corrupt: skipped", path.display());
                    stats.count_drop(DropReason::SpillCorrupt, 1, 0);
                    self.pop();
                }
            }
        }
        None
    }

    /// Deletes the oldest record (it was acknowledged, or dropped).
    pub fn pop(&mut self) {
        if let Some(record) = self.files.pop_front() {
            let _ = std::fs::remove_file(self.path(record.seq));
            self.bytes -= record.size;
        }
        if self.files.is_empty() {
            self.capped = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64) -> Batch {
        Batch {
            agent_id: "a".into(),
            sequence: seq,
            strings: vec![vec![b'x'; 100]],
            ..Default::default()
        }
    }

    #[test]
    fn replays_oldest_first_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let mut spill = Spill::open(dir.path(), 1 << 20).unwrap();
        for seq in 1..=3 {
            spill.push(&batch(seq), &stats);
        }
        assert_eq!(spill.front(&stats).unwrap().sequence, 1);
        spill.pop();
        drop(spill);
        // A new agent finds what is left, in order, and keeps numbering.
        let mut spill = Spill::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spill.len(), 2);
        spill.push(&batch(4), &stats);
        let mut seqs = Vec::new();
        while let Some(b) = spill.front(&stats) {
            seqs.push(b.sequence);
            spill.pop();
        }
        assert_eq!(seqs, vec![2, 3, 4]);
        assert_eq!(spill.bytes(), 0);
        assert_eq!(stats.spill.spilled.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn cap_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let one = encode_record(&batch(1)).len() as u64;
        let mut spill = Spill::open(dir.path(), one * 2).unwrap();
        for seq in 1..=5 {
            spill.push(&batch(seq), &stats);
        }
        assert_eq!(spill.len(), 2);
        assert_eq!(stats.dropped(DropReason::SpillCap).batches, 3);
        assert_eq!(spill.front(&stats).unwrap().sequence, 4);
    }

    #[test]
    fn cap_counts_the_samples_dropped_also_of_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let with_samples = |seq| Batch {
            samples: vec![profiler_proto::v1::Sample {
                label_set: 0,
                stack: 0,
                value: 4,
            }],
            ..batch(seq)
        };
        let one = encode_record(&with_samples(1)).len() as u64;
        let mut spill = Spill::open(dir.path(), one * 2).unwrap();
        spill.push(&with_samples(1), &stats);
        drop(spill);
        // The next run knows the old record only by its file.
        let mut spill = Spill::open(dir.path(), one * 2).unwrap();
        for seq in 2..=4 {
            spill.push(&with_samples(seq), &stats);
        }
        spill.publish(&stats.spill);
        assert_eq!(stats.dropped(DropReason::SpillCap).batches, 2);
        assert_eq!(stats.dropped(DropReason::SpillCap).samples, 8);
        assert_eq!(stats.spill.records.load(Ordering::Relaxed), 2);
        assert_eq!(stats.spill.bytes.load(Ordering::Relaxed), one * 2);
    }

    #[test]
    fn corrupt_records_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let mut spill = Spill::open(dir.path(), 1 << 20).unwrap();
        for seq in 1..=3 {
            spill.push(&batch(seq), &stats);
        }
        // Flip a payload byte of the first record, truncate the second.
        let first = spill.path(spill.files[0].seq);
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        let second = spill.path(spill.files[1].seq);
        let bytes = std::fs::read(&second).unwrap();
        std::fs::write(&second, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(spill.front(&stats).unwrap().sequence, 3);
        assert_eq!(stats.dropped(DropReason::SpillCorrupt).batches, 2);
        assert!(!first.exists() && !second.exists());
    }

    #[test]
    fn unwritable_directory_counts_write_errors() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let mut spill = Spill::open(dir.path(), 1 << 20).unwrap();
        std::fs::remove_dir_all(dir.path()).unwrap();
        spill.push(&batch(1), &stats);
        let d = stats.dropped(DropReason::SpillWriteError);
        assert_eq!((d.batches, d.samples), (1, 0));
        assert!(spill.is_empty());
    }

    #[test]
    fn records_reject_garbage() {
        assert!(decode_record(b"").is_none());
        assert!(decode_record(b"PBAT01\x00").is_none());
        let mut r = encode_record(&batch(9));
        assert_eq!(decode_record(&r).unwrap().sequence, 9);
        r[0] = b'X';
        assert!(decode_record(&r).is_none());
    }
}

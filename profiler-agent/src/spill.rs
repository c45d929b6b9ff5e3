//! Spilling unacknowledged batches to disk while the collector is away, so
//! an outage longer than the memory queue loses nothing until the spill cap.
//!
//! One file per batch, named by a sequence that orders them oldest first:
//! `MAGIC`, payload length (u32 LE), CRC-32 of the payload (u32 LE), then the
//! protobuf-encoded batch. Files are written to a temporary name, synced and
//! renamed, so a crash leaves whole records or none. A record that fails its
//! checksum is deleted and counted, and the rest replays. Files left by an
//! earlier run are replayed too (the collector de-duplicates re-sends).
use std::{
    collections::VecDeque,
    fs::File,
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use profiler_proto::v1::Batch;
use prost::Message;

use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"PBAT01";
const HEADER: usize = MAGIC.len() + 8;
const SUFFIX: &str = "batch";

/// Counters of the spill (totals since start).
#[derive(Debug, Default)]
pub struct SpillStats {
    pub spilled: AtomicU64,
    pub replayed: AtomicU64,
    /// Oldest records deleted to stay under the cap.
    pub dropped_cap: AtomicU64,
    /// Records that failed their checksum or could not be decoded.
    pub dropped_corrupt: AtomicU64,
    /// Batches that could not be written (disk full, I/O error).
    pub dropped_write_error: AtomicU64,
}

/// Batches on disk, oldest first.
pub struct Spill {
    dir: PathBuf,
    cap_bytes: u64,
    files: VecDeque<(PathBuf, u64)>,
    bytes: u64,
    next: u64,
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
        let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == SUFFIX))
            .map(|p| {
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (p, size)
            })
            .collect();
        files.sort();
        let next = files
            .last()
            .and_then(|(p, _)| p.file_stem()?.to_str()?.parse::<u64>().ok())
            .map_or(0, |n| n + 1);
        let bytes = files.iter().map(|(_, s)| s).sum();
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
        })
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
    pub fn push(&mut self, batch: &Batch, stats: &SpillStats) {
        let record = encode_record(batch);
        let path = self.dir.join(format!("{:020}.{SUFFIX}", self.next));
        let tmp = self.dir.join(format!("{:020}.tmp", self.next));
        let written = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&record)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            stats.dropped_write_error.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("could not spill a batch to {}: {e}", self.dir.display());
            return;
        }
        self.next += 1;
        self.files.push_back((path, record.len() as u64));
        self.bytes += record.len() as u64;
        stats.spilled.fetch_add(1, Ordering::Relaxed);
        while self.bytes > self.cap_bytes && self.files.len() > 1 {
            self.pop();
            stats.dropped_cap.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("spill directory over its cap: dropped the oldest batch");
        }
    }

    /// The oldest valid record; corrupt ones on the way are deleted and counted.
    pub fn front(&mut self, stats: &SpillStats) -> Option<Batch> {
        while let Some((path, _)) = self.files.front() {
            let mut bytes = Vec::new();
            let read = File::open(path).and_then(|mut f| f.read_to_end(&mut bytes));
            match read.ok().and_then(|_| decode_record(&bytes)) {
                Some(batch) => return Some(batch),
                None => {
                    tracing::warn!("spilled record {} is corrupt: skipped", path.display());
                    stats.dropped_corrupt.fetch_add(1, Ordering::Relaxed);
                    self.pop();
                }
            }
        }
        None
    }

    /// Deletes the oldest record (it was acknowledged, or dropped).
    pub fn pop(&mut self) {
        if let Some((path, size)) = self.files.pop_front() {
            let _ = std::fs::remove_file(&path);
            self.bytes -= size;
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
        let stats = SpillStats::default();
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
        assert_eq!(stats.spilled.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn cap_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let stats = SpillStats::default();
        let one = encode_record(&batch(1)).len() as u64;
        let mut spill = Spill::open(dir.path(), one * 2).unwrap();
        for seq in 1..=5 {
            spill.push(&batch(seq), &stats);
        }
        assert_eq!(spill.len(), 2);
        assert_eq!(stats.dropped_cap.load(Ordering::Relaxed), 3);
        assert_eq!(spill.front(&stats).unwrap().sequence, 4);
    }

    #[test]
    fn corrupt_records_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let stats = SpillStats::default();
        let mut spill = Spill::open(dir.path(), 1 << 20).unwrap();
        for seq in 1..=3 {
            spill.push(&batch(seq), &stats);
        }
        // Flip a payload byte of the first record, truncate the second.
        let first = spill.files[0].0.clone();
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        let second = spill.files[1].0.clone();
        let bytes = std::fs::read(&second).unwrap();
        std::fs::write(&second, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(spill.front(&stats).unwrap().sequence, 3);
        assert_eq!(stats.dropped_corrupt.load(Ordering::Relaxed), 2);
        assert!(!first.exists() && !second.exists());
    }

    #[test]
    fn unwritable_directory_counts_write_errors() {
        let dir = tempfile::tempdir().unwrap();
        let stats = SpillStats::default();
        let mut spill = Spill::open(dir.path(), 1 << 20).unwrap();
        std::fs::remove_dir_all(dir.path()).unwrap();
        spill.push(&batch(1), &stats);
        assert_eq!(stats.dropped_write_error.load(Ordering::Relaxed), 1);
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

//! The durable log of a node's consensus state: log entries, the hard state
//! (term, vote, commit) and the membership, as opaque bytes in one
//! append-only [`LogWriter`] file.
//!
//! # Records
//!
//! - [`ENTRY`]: `[index u64 LE][entry bytes]`. An entry at index `i`
//!   replaces the entries from `i` on: a leader may overwrite a follower's
//!   uncommitted tail, and the replay does the same.
//! - [`HARD_STATE`]: the encoded hard state; the last one wins.
//! - [`MEMBERSHIP`]: the encoded membership; the last one wins.
//!
//! [`RaftLog::sync`] makes everything appended so far durable: the caller
//! syncs before it sends the messages that promise what it appended (a vote,
//! an acknowledged entry). [`RaftLog::open`] replays the file (after the
//! log's own recovery cut a torn tail) into a [`Replayed`].
//!
//! The log is never compacted: it grows by one record per entry, and the
//! entries are the cluster's control decisions (jobs, placements,
//! membership, liveness), a few per job. The encodings belong to the caller.

use std::path::Path;

use crate::error::StorageError;
use crate::log::{LogConfig, LogReader, LogWriter};

/// Record kind: one log entry.
pub const ENTRY: u8 = 1;
/// Record kind: the hard state.
pub const HARD_STATE: u8 = 2;
/// Record kind: the membership.
pub const MEMBERSHIP: u8 = 3;

/// What the file held, replayed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Entries in index order, no gaps, overwrites applied.
    pub entries: Vec<(u64, Vec<u8>)>,
    pub hard_state: Option<Vec<u8>>,
    pub membership: Option<Vec<u8>>,
}

/// The consensus log of one node.
pub struct RaftLog {
    writer: LogWriter,
}

impl RaftLog {
    /// Opens (or creates) the log at `path` and replays it.
    pub fn open(path: &Path) -> Result<(RaftLog, Replayed), StorageError> {
        let config = LogConfig::default();
        let writer = LogWriter::open(path, config)?;
        let mut replayed = Replayed::default();
        let mut reader = LogReader::open(path, config)?;
        while let Some(record) = reader.next_record()? {
            match record.kind {
                ENTRY => {
                    if record.payload.len() < 8 {
                        return Err(StorageError::Invalid {
                            path: path.to_path_buf(),
                            offset: record.offset,
                            what: "a consensus log entry shorter than its index".into(),
                        });
                    }
                    let index = u64::from_le_bytes(record.payload[..8].try_into().unwrap());
                    let entries = &mut replayed.entries;
                    let first = entries.first().map_or(index, |(i, _)| *i);
                    if index < first || index > first + entries.len() as u64 {
                        return Err(StorageError::Invalid {
                            path: path.to_path_buf(),
                            offset: record.offset,
                            what: format!(
                                "consensus log entry {index} does not follow entries {first}..{}",
                                first + entries.len() as u64
                            ),
                        });
                    }
                    entries.truncate((index - first) as usize);
                    entries.push((index, record.payload[8..].to_vec()));
                }
                HARD_STATE => replayed.hard_state = Some(record.payload.to_vec()),
                MEMBERSHIP => replayed.membership = Some(record.payload.to_vec()),
                other => {
                    return Err(StorageError::Invalid {
                        path: path.to_path_buf(),
                        offset: record.offset,
                        what: format!("a consensus log record of unknown kind {other}"),
                    })
                }
            }
        }
        Ok((RaftLog { writer }, replayed))
    }

    /// Appends an entry at `index` (replacing any from `index` on).
    pub fn append_entry(&mut self, index: u64, entry: &[u8]) -> Result<(), StorageError> {
        let mut payload = Vec::with_capacity(8 + entry.len());
        payload.extend_from_slice(&index.to_le_bytes());
        payload.extend_from_slice(entry);
        self.writer.append(ENTRY, &payload).map(drop)
    }

    pub fn set_hard_state(&mut self, hard_state: &[u8]) -> Result<(), StorageError> {
        self.writer.append(HARD_STATE, hard_state).map(drop)
    }

    pub fn set_membership(&mut self, membership: &[u8]) -> Result<(), StorageError> {
        self.writer.append(MEMBERSHIP, membership).map(drop)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.writer.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dirigo-raftlog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_replay_applies_overwrites_and_keeps_the_last_states() {
        let dir = temp("replay");
        let path = dir.join("raft.log");
        {
            let (mut log, replayed) = RaftLog::open(&path).unwrap();
            assert_eq!(replayed, Replayed::default());
            for i in 1..=5u64 {
                log.append_entry(i, &[i as u8; 3]).unwrap();
            }
            log.set_hard_state(b"hs1").unwrap();
            // A new leader overwrites 4 and 5.
            log.append_entry(4, b"new4").unwrap();
            log.set_membership(b"m1").unwrap();
            log.set_hard_state(b"hs2").unwrap();
            log.sync().unwrap();
        }
        let (mut log, replayed) = RaftLog::open(&path).unwrap();
        let indexes: Vec<u64> = replayed.entries.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![1, 2, 3, 4]);
        assert_eq!(replayed.entries[3].1, b"new4");
        assert_eq!(replayed.entries[2].1, vec![3u8; 3]);
        assert_eq!(replayed.hard_state.as_deref(), Some(&b"hs2"[..]));
        assert_eq!(replayed.membership.as_deref(), Some(&b"m1"[..]));
        log.append_entry(5, b"five").unwrap();
        log.sync().unwrap();
        drop(log);
        let (_, replayed) = RaftLog::open(&path).unwrap();
        assert_eq!(replayed.entries.len(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_gap_in_the_entries_is_refused_naming_the_file() {
        let dir = temp("gap");
        let path = dir.join("raft.log");
        {
            let (mut log, _) = RaftLog::open(&path).unwrap();
            log.append_entry(1, b"a").unwrap();
            log.append_entry(3, b"c").unwrap();
            log.sync().unwrap();
        }
        let error = RaftLog::open(&path).err().expect("a gap is corruption");
        let text = error.to_string();
        assert!(text.contains("raft.log"), "{text}");
        assert!(text.contains("entry 3"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_replays() {
        let dir = temp("torn");
        let path = dir.join("raft.log");
        {
            let (mut log, _) = RaftLog::open(&path).unwrap();
            log.append_entry(1, b"one").unwrap();
            log.append_entry(2, b"two").unwrap();
            log.sync().unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 2).unwrap();
        let (_, replayed) = RaftLog::open(&path).unwrap();
        assert_eq!(replayed.entries, vec![(1, b"one".to_vec())]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

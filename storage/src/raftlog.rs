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
//! - [`SNAPSHOT`]: `[index u64 LE][snapshot bytes]`: the state as of entry
//!   `index`, which stands for every entry up to it. Only ever the file's
//!   first record; the entries after it start past `index`.
//!
//! [`RaftLog::sync`] makes everything appended so far durable: the caller
//! syncs before it sends the messages that promise what it appended (a vote,
//! an acknowledged entry). [`RaftLog::open`] replays the file (after the
//! log's own recovery cut a torn tail) into a [`Replayed`].
//!
//! The log grows by one record per entry until the caller compacts it:
//! [`RaftLog::rewrite`] writes a new file (a snapshot, the membership, the
//! hard state and the entries past the snapshot) beside the old one,
//! fsyncs it, renames it over the old one and fsyncs the directory, so a
//! crash leaves one whole file or the other. The encodings belong to the
//! caller.

use std::path::Path;

use crate::error::StorageError;
use crate::log::{LogConfig, LogReader, LogWriter};

/// Record kind: one log entry.
pub const ENTRY: u8 = 1;
/// Record kind: the hard state.
pub const HARD_STATE: u8 = 2;
/// Record kind: the membership.
pub const MEMBERSHIP: u8 = 3;
/// Record kind: a snapshot, standing for the entries up to its index.
pub const SNAPSHOT: u8 = 4;

/// What the file held, replayed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The snapshot the file starts with: its index and bytes.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// Entries in index order, no gaps, overwrites applied; past the
    /// snapshot's index.
    pub entries: Vec<(u64, Vec<u8>)>,
    pub hard_state: Option<Vec<u8>>,
    pub membership: Option<Vec<u8>>,
}

/// The consensus log of one node.
pub struct RaftLog {
    writer: LogWriter,
    path: std::path::PathBuf,
}

impl RaftLog {
    /// Opens (or creates) the log at `path` and replays it.
    pub fn open(path: &Path) -> Result<(RaftLog, Replayed), StorageError> {
        let config = LogConfig::default();
        let writer = LogWriter::open(path, config)?;
        let mut replayed = Replayed::default();
        let mut reader = LogReader::open(path, config)?;
        let mut first_record = true;
        while let Some(record) = reader.next_record()? {
            let invalid = |what: String| StorageError::Invalid {
                path: path.to_path_buf(),
                offset: record.offset,
                what,
            };
            if record.kind == SNAPSHOT {
                if !first_record || record.payload.len() < 8 {
                    return Err(invalid(
                        "a consensus snapshot that is not the log's first record, or shorter than its index"
                            .into(),
                    ));
                }
                let index = u64::from_le_bytes(record.payload[..8].try_into().unwrap());
                replayed.snapshot = Some((index, record.payload[8..].to_vec()));
                first_record = false;
                continue;
            }
            first_record = false;
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
                    let after = replayed.snapshot.as_ref().map(|(i, _)| *i);
                    if after.is_some_and(|snapshot| index <= snapshot) {
                        return Err(invalid(format!(
                            "consensus log entry {index} is within the snapshot that ends at {}",
                            after.unwrap_or_default()
                        )));
                    }
                    let first = entries
                        .first()
                        .map_or(after.map_or(index, |i| i + 1), |(i, _)| *i);
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
        let path = path.to_path_buf();
        Ok((RaftLog { writer, path }, replayed))
    }

    /// Replace the whole log, atomically, with `snapshot` (its index and
    /// bytes), the membership, the hard state and `entries` (each past the
    /// snapshot's index, in order): compaction, or a snapshot installed
    /// from the leader. Durable when it returns.
    pub fn rewrite(
        &mut self,
        snapshot: (u64, &[u8]),
        membership: &[u8],
        hard_state: &[u8],
        entries: &[(u64, &[u8])],
    ) -> Result<(), StorageError> {
        let (index, bytes) = snapshot;
        if let Some((first, _)) = entries.first() {
            assert!(*first == index + 1, "entries follow the snapshot");
        }
        let temp = self.path.with_extension("log.new");
        match std::fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("removing", &temp, None, e)),
        }
        {
            let mut writer = LogWriter::open(&temp, LogConfig::default())?;
            writer.append(SNAPSHOT, &indexed(index, bytes))?;
            writer.append(MEMBERSHIP, membership)?;
            writer.append(HARD_STATE, hard_state)?;
            for (entry_index, entry) in entries {
                writer.append(ENTRY, &indexed(*entry_index, entry))?;
            }
            writer.sync()?;
        }
        std::fs::rename(&temp, &self.path)
            .map_err(|e| StorageError::io("rename over", &self.path, None, e))?;
        crate::manifest::sync_parent_dir(&self.path)?;
        self.writer = LogWriter::open(&self.path, LogConfig::default())?;
        Ok(())
    }

    /// Appends an entry at `index` (replacing any from `index` on).
    pub fn append_entry(&mut self, index: u64, entry: &[u8]) -> Result<(), StorageError> {
        self.writer.append(ENTRY, &indexed(index, entry)).map(drop)
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

/// A record's payload of an index and bytes: `[index u64 LE][bytes]`.
fn indexed(index: u64, bytes: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + bytes.len());
    payload.extend_from_slice(&index.to_le_bytes());
    payload.extend_from_slice(bytes);
    payload
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
    fn a_rewrite_keeps_the_snapshot_the_states_and_the_later_entries() {
        let dir = temp("rewrite");
        let path = dir.join("raft.log");
        {
            let (mut log, _) = RaftLog::open(&path).unwrap();
            for i in 1..=10u64 {
                log.append_entry(i, &[i as u8; 4]).unwrap();
            }
            log.sync().unwrap();
            let later: Vec<(u64, Vec<u8>)> = (8..=10u64).map(|i| (i, vec![i as u8; 4])).collect();
            let later: Vec<(u64, &[u8])> = later.iter().map(|(i, e)| (*i, &e[..])).collect();
            log.rewrite((7, b"state at 7"), b"m7", b"hs7", &later)
                .unwrap();
            // Appends go on after the rewrite.
            log.append_entry(11, b"eleven").unwrap();
            log.sync().unwrap();
        }
        let before = std::fs::metadata(&path).unwrap().len();
        let (mut log, replayed) = RaftLog::open(&path).unwrap();
        assert_eq!(replayed.snapshot, Some((7, b"state at 7".to_vec())));
        let indexes: Vec<u64> = replayed.entries.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![8, 9, 10, 11]);
        assert_eq!(replayed.membership.as_deref(), Some(&b"m7"[..]));
        assert_eq!(replayed.hard_state.as_deref(), Some(&b"hs7"[..]));
        // A snapshot installed from the leader, with no entries after it.
        log.rewrite((20, b"state at 20"), b"m20", b"hs20", &[])
            .unwrap();
        drop(log);
        let (_, replayed) = RaftLog::open(&path).unwrap();
        assert_eq!(replayed.snapshot, Some((20, b"state at 20".to_vec())));
        assert!(replayed.entries.is_empty());
        assert!(std::fs::metadata(&path).unwrap().len() < before);
        assert!(!dir.join("raft.log.new").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_entry_within_the_snapshot_is_refused_naming_it() {
        let dir = temp("within");
        let path = dir.join("raft.log");
        {
            let (mut log, _) = RaftLog::open(&path).unwrap();
            log.rewrite((5, b"s"), b"m", b"hs", &[]).unwrap();
            log.append_entry(5, b"five again").unwrap();
            log.sync().unwrap();
        }
        let text = RaftLog::open(&path).err().expect("corrupt").to_string();
        assert!(text.contains("entry 5 is within the snapshot"), "{text}");
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

//! The on-disk layer of checkpoints: framed chunk files, atomically committed
//! manifests, staged output files, the exactly-once append of staged output,
//! retention, and fault injection for tests.
//!
//! The engine decides what the bytes mean (which actor's state a part holds,
//! what a manifest lists); this module only frames, checksums, commits, lists
//! and deletes them. Nothing here panics on bad input: a torn or flipped file
//! is a [`StorageError::CorruptFile`] naming the file, the offset and the
//! [`Damage`].
//!
//! # Layout
//!
//! ```text
//! root/checkpoints/MANIFEST-<epoch, 20 digits>   a committed manifest
//! root/checkpoints/<chunk name>                  a chunk: framed parts
//! root/checkpoints/.<name>.tmp                   a write in progress, or left by a crash
//! root/staged/<name>                             output rows staged for an epoch
//! ```
//!
//! # Protocol (the engine's; described here so that the guarantees read right)
//!
//! 1. For epoch `e`, write state with [`CheckpointDir::write_chunk`] and
//!    output rows with a [`StagedWriter`]. Neither is visible to a restore
//!    yet: only a manifest makes them so.
//! 2. [`CheckpointDir::commit_manifest`] of `e`, listing the [`PartRef`]s,
//!    the [`StagedRef`]s and each output's length before the append. This
//!    rename is the commit point.
//! 3. [`CheckpointDir::append_output`] per output. A crash during it is
//!    mended by running it again with the same arguments from the manifest:
//!    it first cuts the output back to its length before the append.
//! 4. [`CheckpointDir::retain`] deletes what no kept manifest refers to.
//!
//! # Chunk format
//!
//! ```text
//! offset 0            4          8             12
//!        [magic u32 LE][len u32 LE][crc32c u32 LE][bytes: len]   one part
//! ```
//!
//! Parts are packed back to back. The crc32c covers the bytes; a [`PartRef`]
//! (file, offset of the frame, len, crc) carries the same len and crc, so a
//! read checks the frame against the reference as well as against the data:
//! a part read at a wrong offset, from an older chunk of the same name or
//! after a bit flip in any of its bytes is an error. A chunk is written to a
//! temp file, fsynced and renamed, so the chunk's name never holds a half
//! file, even after a crash; a failed write removes its temp file.
//!
//! # Manifest format
//!
//! ```text
//! offset 0            4              8             16            24              28
//!        [magic u32 LE][version u32 LE][epoch u64 LE][len u64 LE][crc32c u32 LE][body: len]
//! ```
//!
//! The crc32c covers the first 24 bytes and the body. The file must be
//! exactly `28 + len` bytes and the epoch inside must match the name, so a
//! manifest copied or renamed to another epoch is refused. Commit is
//! [`manifest::commit_atomic`] (temp, fsync, rename, fsync directory).
//!
//! # Staged files
//!
//! Plain bytes, no framing: they are appended verbatim to an output. The
//! [`StagedWriter`] computes the length and crc32c as the bytes pass, and
//! the [`StagedRef`] it returns (which the manifest stores) is what
//! [`CheckpointDir::verify_staged`] and [`CheckpointDir::append_output`]
//! check them against.
//!
//! # Retention and concurrency
//!
//! [`CheckpointDir::retain`] deletes every file of this layer that its
//! arguments do not name as live, including chunks and staged files of a
//! checkpoint still being written. The caller must therefore either run it
//! when no checkpoint is in flight or name the in-flight files as live. The
//! engine runs it in full only at a restore (no sink is writing yet); during
//! a run it passes `live_staged: None`, which leaves staged files alone, and
//! deletes the staged files of dropped manifests by name
//! ([`CheckpointDir::remove_staged`]).
//! Other calls may run concurrently on distinct names (a `CheckpointDir` is
//! `Clone` and `Send`); two writers of one name at once are the caller's bug.
//!
//! # Bounds
//!
//! A part is at most [`PART_BYTES_MAX`], a manifest body at most
//! [`MANIFEST_BODY_BYTES_MAX`]. [`CheckpointDir::read_parts`] reads runs of
//! adjacent parts with one `pread` into a buffer of at most
//! [`READ_RUN_BYTES_MAX`]; staged files are written and copied through
//! buffers of [`STAGED_BUFFER_BYTES`].

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Damage, StorageError};
use crate::manifest::{self, MANIFEST_BYTES_MAX};

/// First four bytes of every part frame: "DGPT".
pub const PART_MAGIC: u32 = u32::from_le_bytes(*b"DGPT");

/// Bytes of a part frame's header: magic (4), len (4), crc32c (4).
pub const PART_HEADER_BYTES: usize = 12;

/// Largest part, header excluded, that may be written or read.
pub const PART_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// First four bytes of every manifest: "DGMF".
pub const MANIFEST_MAGIC: u32 = u32::from_le_bytes(*b"DGMF");

/// The format of a checkpoint this code writes and reads: the manifest's,
/// and the encodings of the parts it refers to. 2: an actor's bookkeeping
/// also holds its routing tables and reroute marks. 3: q4's key groups no
/// longer carry their closing index (derived when read). 4: an actor's
/// bookkeeping also counts the checkpoint parts it handed over. A
/// checkpoint of another version is refused, naming the version, rather
/// than misread.
pub const MANIFEST_FORMAT_VERSION: u32 = 4;

/// Bytes of a manifest's header: magic (4), version (4), epoch (8), len (8),
/// crc32c (4).
pub const MANIFEST_HEADER_BYTES: usize = 28;

/// Largest manifest body: the file, header included, stays within
/// [`MANIFEST_BYTES_MAX`].
pub const MANIFEST_BODY_BYTES_MAX: u64 = MANIFEST_BYTES_MAX - MANIFEST_HEADER_BYTES as u64;

/// Largest run of adjacent parts that [`CheckpointDir::read_parts`] reads
/// with one `pread`; a part larger than this is read on its own, straight
/// into its result.
pub const READ_RUN_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Buffer of a [`StagedWriter`], of a chunk write, and of the copies made
/// by `verify_staged` and `append_output`.
pub const STAGED_BUFFER_BYTES: usize = 1024 * 1024;

/// How long a staged write waits out a full disk by default (see
/// [`StagedWriter`]).
pub const STAGED_RETRY_FOR_DEFAULT: Duration = Duration::from_secs(60);

/// The longest pause between two tries of a staged write.
const STAGED_RETRY_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The file of a data directory's fence (see [`CheckpointDir::fence`]).
const FENCE_FILE_NAME: &str = "fence";
const CHECKPOINTS_DIR_NAME: &str = "checkpoints";
const STAGED_DIR_NAME: &str = "staged";
const MANIFEST_PREFIX: &str = "MANIFEST-";
const EPOCH_DIGITS: usize = 20;
const ENOSPC: i32 = 28;

/// Where one part lies: the chunk file's name (in `checkpoints/`), the
/// offset of its frame header, and the length and crc32c of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartRef {
    pub file: String,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl PartRef {
    /// Bytes the part's frame occupies in its chunk, header included.
    pub fn frame_bytes(&self) -> u64 {
        PART_HEADER_BYTES as u64 + self.len as u64
    }
}

/// A finished staged file: its name (in `staged/`), length and crc32c.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StagedRef {
    pub file: String,
    pub len: u64,
    pub crc: u32,
}

/// Fault injection for tests. [`Faults::arm_enospc`]`(n)` makes the next `n`
/// writes of this layer fail with `ENOSPC` (raw OS error 28), as a full disk
/// would. A write here is one call of [`CheckpointDir::write_chunk`] (it
/// fails after writing some bytes, which are removed),
/// [`CheckpointDir::write_chunk_async`] or [`CheckpointDir::commit_manifest`]
/// (it fails before the temp file is renamed; the previous manifests stay).
/// [`Faults::arm_staged_enospc`]`(n)` does the same to the next `n` buffer
/// writes of staged files, each of which lands half its bytes first; the
/// [`StagedWriter`] tries them again. [`CheckpointDir::append_output`] is
/// never faulted: it is mended by a rerun, not by a retry of the checkpoint.
///
/// Clones share one counter, so a test can keep a clone and arm it while a
/// job runs. Unarmed (the default), a check costs one relaxed load.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    enospc_writes: Arc<AtomicU64>,
    staged_enospc_writes: Arc<AtomicU64>,
    /// Microseconds every [`CheckpointDir::write_chunk_async`] waits first (a
    /// slow disk, to widen the windows a test looks into).
    async_write_delay_us: Arc<AtomicU64>,
}

impl Faults {
    /// Faults with the next `writes` writes armed to fail with `ENOSPC`.
    pub fn enospc(writes: u64) -> Faults {
        let faults = Faults::default();
        faults.arm_enospc(writes);
        faults
    }

    /// Makes the next `writes` writes fail with `ENOSPC` (replacing any
    /// count still armed).
    pub fn arm_enospc(&self, writes: u64) {
        self.enospc_writes.store(writes, Ordering::Relaxed);
    }

    /// Makes the next `writes` buffer writes of staged files fail with
    /// `ENOSPC` after writing half their bytes.
    pub fn arm_staged_enospc(&self, writes: u64) {
        self.staged_enospc_writes.store(writes, Ordering::Relaxed);
    }

    /// Staged writes still armed to fail.
    pub fn staged_enospc_pending(&self) -> u64 {
        self.staged_enospc_writes.load(Ordering::Relaxed)
    }

    /// Disarms every fault.
    pub fn disarm(&self) {
        self.arm_enospc(0);
        self.arm_staged_enospc(0);
        self.delay_async_writes(std::time::Duration::ZERO);
    }

    /// Makes every chunk write on a glommio executor wait `delay` first, as
    /// a slow disk would.
    pub fn delay_async_writes(&self, delay: std::time::Duration) {
        self.async_write_delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Writes still armed to fail.
    pub fn enospc_pending(&self) -> u64 {
        self.enospc_writes.load(Ordering::Relaxed)
    }

    /// Consumes one armed fault, if any, as an `ENOSPC` error.
    fn check_write(&self) -> io::Result<()> {
        take_one(&self.enospc_writes)
    }

    /// Consumes one armed staged-write fault, if any, as an `ENOSPC` error.
    fn check_staged_write(&self) -> io::Result<()> {
        take_one(&self.staged_enospc_writes)
    }
}

/// `ENOSPC` if `armed` was above zero (and is now one less).
fn take_one(armed: &AtomicU64) -> io::Result<()> {
    if armed.load(Ordering::Relaxed) == 0 {
        return Ok(());
    }
    let taken = armed
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    if taken {
        return Err(io::Error::from_raw_os_error(ENOSPC));
    }
    Ok(())
}

/// The checkpoint directories of one root (see the module header).
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
    checkpoints: PathBuf,
    staged: PathBuf,
    faults: Faults,
    staged_retry_for: Duration,
}

impl CheckpointDir {
    /// Opens `root/checkpoints` and `root/staged`, creating them (and
    /// `root`) if needed, durably. A relative `root` is taken from the
    /// current directory now: glommio opens a directory by path alone, and
    /// refuses a relative one (EBADF).
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        let root = &std::path::absolute(root)
            .map_err(|e| StorageError::io("resolve directory", root, None, e))?;
        let checkpoints = root.join(CHECKPOINTS_DIR_NAME);
        let staged = root.join(STAGED_DIR_NAME);
        for dir in [root, &checkpoints, &staged] {
            if !dir.is_dir() {
                fs::create_dir_all(dir)
                    .map_err(|e| StorageError::io("create directory", dir, None, e))?;
                manifest::sync_parent_dir(dir)?;
            }
        }
        Ok(CheckpointDir {
            root: root.to_path_buf(),
            checkpoints,
            staged,
            faults: Faults::default(),
            staged_retry_for: STAGED_RETRY_FOR_DEFAULT,
        })
    }

    /// The placement the directory's fence holds (`root/fence`), if any:
    /// the newest run of a cluster's job that claimed it.
    pub fn fence(&self) -> Result<Option<u64>, StorageError> {
        let path = self.root.join(FENCE_FILE_NAME);
        match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| StorageError::Invalid {
                    path,
                    offset: 0,
                    what: format!("a fence of {text:?}, not a placement number"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("read", path, None, e)),
        }
    }

    /// Set the fence to `placement`, atomically and durably.
    pub fn set_fence(&self, placement: u64) -> Result<(), StorageError> {
        manifest::commit_atomic(
            &self.root,
            FENCE_FILE_NAME,
            placement.to_string().as_bytes(),
        )
    }

    /// The same directories with `faults` armed (see [`Faults`]).
    pub fn with_faults(self, faults: Faults) -> Self {
        CheckpointDir { faults, ..self }
    }

    /// The same directories with staged writes waiting out a full disk for
    /// at most `retry_for` (default [`STAGED_RETRY_FOR_DEFAULT`]).
    pub fn with_staged_retry_for(self, retry_for: Duration) -> Self {
        CheckpointDir {
            staged_retry_for: retry_for,
            ..self
        }
    }

    /// How long a staged write waits out a full disk.
    pub fn staged_retry_for(&self) -> Duration {
        self.staged_retry_for
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/checkpoints`: manifests and chunks.
    pub fn checkpoints_dir(&self) -> &Path {
        &self.checkpoints
    }

    /// `root/staged`: staged output files.
    pub fn staged_dir(&self) -> &Path {
        &self.staged
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Writes chunk `checkpoints/<name>` holding `parts` one after another,
    /// each framed, through a temp file that is fsynced and renamed (and the
    /// directory fsynced): after a crash the name holds the whole chunk or
    /// nothing. An existing chunk of that name is replaced. Returns one
    /// [`PartRef`] per part, in order. On error nothing is left behind.
    ///
    /// `name` is a plain file name not starting with `MANIFEST-`.
    pub fn write_chunk(&self, name: &str, parts: &[&[u8]]) -> Result<Vec<PartRef>, StorageError> {
        let (path, temp) = self.chunk_paths(name, parts.iter().map(|p| p.len()))?;
        let refs = match self.write_frames(&temp, name, parts) {
            Ok(refs) => refs,
            Err(error) => {
                let _ = fs::remove_file(&temp);
                return Err(error);
            }
        };
        if let Err(e) = fs::rename(&temp, &path) {
            let _ = fs::remove_file(&temp);
            return Err(StorageError::io("rename over", &path, None, e));
        }
        manifest::sync_dir(&self.checkpoints)?;
        Ok(refs)
    }

    /// The final and temp paths of chunk `name`, once the name and every
    /// part's length are checked.
    fn chunk_paths(
        &self,
        name: &str,
        mut part_lens: impl Iterator<Item = usize>,
    ) -> Result<(PathBuf, PathBuf), StorageError> {
        check_chunk_name(name)?;
        let path = self.checkpoints.join(name);
        if let Some(len) = part_lens.find(|&len| len as u64 > PART_BYTES_MAX) {
            return Err(StorageError::FileTooLarge {
                path,
                file_bytes: len as u64,
                file_bytes_max: PART_BYTES_MAX,
            });
        }
        let temp = temp_path(&self.checkpoints, name);
        Ok((path, temp))
    }

    /// [`CheckpointDir::write_chunk`] on a shard's glommio executor: the temp
    /// file is created, written, fdatasynced and renamed, and the directory
    /// synced, all through io_uring, so the shard runs its actors while the
    /// disk works. The same format, references, faults and cleanup. Call it
    /// only inside a glommio executor.
    pub async fn write_chunk_async(
        &self,
        name: &str,
        parts: &[Vec<u8>],
    ) -> Result<Vec<PartRef>, StorageError> {
        let (path, temp) = self.chunk_paths(name, parts.iter().map(|p| p.len()))?;
        let delay_us = self.faults.async_write_delay_us.load(Ordering::Relaxed);
        if delay_us > 0 {
            glommio::timer::sleep(std::time::Duration::from_micros(delay_us)).await;
        }
        let total: usize = parts.iter().map(|p| PART_HEADER_BYTES + p.len()).sum();
        let mut frames = Vec::with_capacity(total);
        let mut refs = Vec::with_capacity(parts.len());
        for part in parts {
            let part_ref = PartRef {
                file: name.to_string(),
                offset: frames.len() as u64,
                len: part.len() as u32,
                crc: crc32c::crc32c(part),
            };
            frames.extend_from_slice(&PART_MAGIC.to_le_bytes());
            frames.extend_from_slice(&part_ref.len.to_le_bytes());
            frames.extend_from_slice(&part_ref.crc.to_le_bytes());
            frames.extend_from_slice(part);
            refs.push(part_ref);
        }
        let written = self.write_file_async(&temp, &path, frames).await;
        if written.is_err() {
            // The error path only: a small unlink, done in place.
            let _ = fs::remove_file(&temp);
        }
        written.map(|()| refs)
    }

    async fn write_file_async(
        &self,
        temp: &Path,
        path: &Path,
        bytes: Vec<u8>,
    ) -> Result<(), StorageError> {
        use glommio::io::{BufferedFile, Directory};
        fn io(
            what: &'static str,
            at: &Path,
            offset: Option<u64>,
            e: glommio::GlommioError<()>,
        ) -> StorageError {
            StorageError::io(what, at, offset, e.into())
        }
        let mut file = BufferedFile::create(temp)
            .await
            .map_err(|e| io("create", temp, None, e))?;
        let len = bytes.len();
        let written = file
            .write_at(bytes, 0)
            .await
            .map_err(|e| io("write", temp, Some(0), e))?;
        if written < len {
            // Rare on a regular file; the checkpoint fails and the next retries.
            return Err(StorageError::io(
                "write",
                temp,
                Some(written as u64),
                io::Error::new(io::ErrorKind::WriteZero, "a short write"),
            ));
        }
        self.faults
            .check_write()
            .map_err(|e| StorageError::io("write", temp, Some(len as u64), e))?;
        file.fdatasync()
            .await
            .map_err(|e| io("fsync", temp, None, e))?;
        file.rename(path)
            .await
            .map_err(|e| io("rename over", path, None, e))?;
        file.close().await.map_err(|e| io("close", path, None, e))?;
        let checkpoints = &self.checkpoints;
        let dir = Directory::open(checkpoints)
            .await
            .map_err(|e| io("open directory", checkpoints, None, e))?;
        dir.sync()
            .await
            .map_err(|e| io("fsync directory", checkpoints, None, e))?;
        dir.close()
            .await
            .map_err(|e| io("close directory", checkpoints, None, e))
    }

    fn write_frames(
        &self,
        temp: &Path,
        name: &str,
        parts: &[&[u8]],
    ) -> Result<Vec<PartRef>, StorageError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(temp)
            .map_err(|e| StorageError::io("create", temp, None, e))?;
        let mut out = BufWriter::with_capacity(STAGED_BUFFER_BYTES, file);
        let mut refs = Vec::with_capacity(parts.len());
        let mut offset = 0u64;
        for part in parts {
            let part_ref = PartRef {
                file: name.to_string(),
                offset,
                len: part.len() as u32,
                crc: crc32c::crc32c(part),
            };
            let mut header = [0u8; PART_HEADER_BYTES];
            header[0..4].copy_from_slice(&PART_MAGIC.to_le_bytes());
            header[4..8].copy_from_slice(&part_ref.len.to_le_bytes());
            header[8..12].copy_from_slice(&part_ref.crc.to_le_bytes());
            out.write_all(&header)
                .and_then(|()| out.write_all(part))
                .map_err(|e| StorageError::io("write", temp, Some(offset), e))?;
            offset += part_ref.frame_bytes();
            refs.push(part_ref);
        }
        // An armed fault strikes as the last buffered bytes meet the disk,
        // after earlier ones may have been written: the caller's cleanup is
        // exercised as it would be by a real full disk.
        self.faults
            .check_write()
            .map_err(|e| StorageError::io("write", temp, Some(offset), e))?;
        let file = out
            .into_inner()
            .map_err(|e| StorageError::io("write", temp, Some(offset), e.into_error()))?;
        file.sync_all()
            .map_err(|e| StorageError::io("fsync", temp, None, e))?;
        Ok(refs)
    }

    /// Reads one part back, checking its frame against `part` and its bytes
    /// against the crc32c. A truncated chunk or a flipped bit is
    /// [`StorageError::CorruptFile`] naming the chunk and the part's offset.
    pub fn read_part(&self, part: &PartRef) -> Result<Vec<u8>, StorageError> {
        let mut bodies = self.read_parts(std::slice::from_ref(part))?;
        Ok(bodies.pop().unwrap_or_default())
    }

    /// Reads many parts, checked as [`CheckpointDir::read_part`] does, and
    /// returns their bytes in the order of `parts`. A chunk is opened once
    /// for each run of consecutive parts in it (group parts by file), and a
    /// run of parts adjacent in the file is read with one `pread` of at most
    /// [`READ_RUN_BYTES_MAX`]: restoring a chunk written by one
    /// `write_chunk` takes a handful of system calls, whatever its part count.
    pub fn read_parts(&self, parts: &[PartRef]) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut bodies = Vec::with_capacity(parts.len());
        let mut chunk: Option<OpenChunk> = None;
        let mut run_buffer = Vec::new();
        let mut first = 0;
        while first < parts.len() {
            let part = &parts[first];
            let open = match chunk.take() {
                Some(open) if open.name == part.file => open,
                _ => OpenChunk::open(&self.checkpoints, &part.file)?,
            };
            let end = run_end(parts, first);
            if part.frame_bytes() > READ_RUN_BYTES_MAX as u64 {
                bodies.push(open.read_alone(part)?);
            } else {
                open.read_run(&parts[first..end], &mut run_buffer, &mut bodies)?;
            }
            chunk = Some(open);
            first = end;
        }
        Ok(bodies)
    }

    /// Commits manifest `epoch` holding `body` (framed as the module header
    /// says) with [`manifest::commit_atomic`] as
    /// `checkpoints/MANIFEST-<epoch, 20 digits>`. Committing an epoch again
    /// replaces it atomically.
    pub fn commit_manifest(&self, epoch: u64, body: &[u8]) -> Result<(), StorageError> {
        let name = manifest_name(epoch);
        if body.len() as u64 > MANIFEST_BODY_BYTES_MAX {
            return Err(StorageError::FileTooLarge {
                path: self.checkpoints.join(&name),
                file_bytes: (MANIFEST_HEADER_BYTES + body.len()) as u64,
                file_bytes_max: MANIFEST_BYTES_MAX,
            });
        }
        let mut framed = Vec::with_capacity(MANIFEST_HEADER_BYTES + body.len());
        framed.extend_from_slice(&MANIFEST_MAGIC.to_le_bytes());
        framed.extend_from_slice(&MANIFEST_FORMAT_VERSION.to_le_bytes());
        framed.extend_from_slice(&epoch.to_le_bytes());
        framed.extend_from_slice(&(body.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&framed), body);
        framed.extend_from_slice(&crc.to_le_bytes());
        framed.extend_from_slice(body);
        debug_assert_eq!(framed.len(), MANIFEST_HEADER_BYTES + body.len());
        self.faults
            .check_write()
            .map_err(|e| StorageError::io("write", temp_path(&self.checkpoints, &name), None, e))?;
        manifest::commit_atomic(&self.checkpoints, &name, &framed)
    }

    /// Epochs of the manifests present, ascending. Temp files and names
    /// that are not exactly `MANIFEST-` and 20 digits are ignored.
    pub fn manifest_epochs(&self) -> Result<Vec<u64>, StorageError> {
        let entries = fs::read_dir(&self.checkpoints)
            .map_err(|e| StorageError::io("list", &self.checkpoints, None, e))?;
        let mut epochs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("list", &self.checkpoints, None, e))?;
            if let Some(epoch) = entry.file_name().to_str().and_then(parse_manifest_name) {
                epochs.push(epoch);
            }
        }
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// Reads manifest `epoch` and returns its body, after checking magic,
    /// format version, the epoch inside against `epoch`, the length against
    /// the file's and the crc32c. A missing manifest is an `Io` error of
    /// kind `NotFound`.
    pub fn read_manifest(&self, epoch: u64) -> Result<Vec<u8>, StorageError> {
        let name = manifest_name(epoch);
        let path = self.checkpoints.join(&name);
        match manifest::read_bounded(&self.checkpoints, &name, MANIFEST_BYTES_MAX)? {
            Some(bytes) => decode_manifest(&path, epoch, bytes),
            None => Err(StorageError::io(
                "open",
                path,
                None,
                io::ErrorKind::NotFound.into(),
            )),
        }
    }

    /// Deletes every manifest whose epoch is not in `keep`, every chunk in
    /// `checkpoints/` not named in `live_chunks`, every staged file not
    /// named in `live_staged`, and the temp file of each of those; then
    /// fsyncs the directories it changed. With `live_staged` `None` the
    /// staged files are left alone (sinks may be writing some). Files that are not of this layer
    /// (directories, links, names it would refuse to write, such as
    /// `MANIFEST-junk`) are never touched, nor is anything outside the two
    /// directories. See the module header on running it while a checkpoint
    /// is in flight.
    pub fn retain(
        &self,
        keep: &[u64],
        live_chunks: &HashSet<String>,
        live_staged: Option<&HashSet<String>>,
    ) -> Result<(), StorageError> {
        let checkpoint_dead = |name: &str| {
            if let Some(epoch) = parse_manifest_name(name) {
                !keep.contains(&epoch)
            } else {
                check_chunk_name(name).is_ok() && !live_chunks.contains(name)
            }
        };
        remove_dead(&self.checkpoints, checkpoint_dead)?;
        let Some(live_staged) = live_staged else {
            return Ok(());
        };
        let staged_dead =
            |name: &str| manifest::check_name(name).is_ok() && !live_staged.contains(name);
        remove_dead(&self.staged, staged_dead)
    }

    /// Deletes the staged files named in `dead` that exist (rows of
    /// checkpoints no kept manifest refers to any more), while sinks may be
    /// writing other staged files: unlike [`CheckpointDir::retain`], it
    /// touches nothing else.
    pub fn remove_staged(&self, dead: &[String]) -> Result<(), StorageError> {
        let mut removed = false;
        for name in dead {
            manifest::check_name(name)?;
            let path = self.staged.join(name);
            match fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("remove", &path, None, e)),
            }
        }
        if removed {
            manifest::sync_dir(&self.staged)?;
        }
        Ok(())
    }

    /// A writer of staged rows `staged/<name>`, replacing an older file of
    /// that name.
    pub fn staged_writer(&self, name: &str) -> Result<StagedWriter, StorageError> {
        manifest::check_name(name)?;
        let path = self.staged.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| StorageError::io("create", &path, None, e))?;
        Ok(StagedWriter {
            name: name.to_string(),
            path,
            file,
            buffer: Vec::with_capacity(STAGED_BUFFER_BYTES),
            in_file: 0,
            len: 0,
            crc: 0,
            failed: None,
            faults: self.faults.clone(),
            retry_for: self.staged_retry_for,
            retried: None,
        })
    }

    /// Checks that staged file `name` is exactly `len` bytes with crc32c
    /// `crc`; otherwise [`StorageError::CorruptFile`] naming it.
    pub fn verify_staged(&self, name: &str, len: u64, crc: u32) -> Result<(), StorageError> {
        let staged = StagedRef {
            file: name.to_string(),
            len,
            crc,
        };
        let mut buffer = vec![0u8; STAGED_BUFFER_BYTES];
        self.copy_staged(&staged, &mut buffer, |_, _| Ok(()))
    }

    /// The exactly-once append of staged output to `output`:
    ///
    /// 1. `output` must hold at least `len_before` bytes (a missing output
    ///    counts as empty, and is created when `len_before` is 0); a shorter
    ///    one lost bytes already appended, and is a
    ///    [`StorageError::CorruptFile`] naming it, with nothing changed.
    /// 2. Every staged file is verified against its length and crc32c, so
    ///    nothing is appended if any is bad.
    /// 3. `output` is cut to `len_before` bytes, removing whatever a crashed
    ///    earlier append left, then each staged file is appended in order
    ///    (its crc checked again as it is copied) and `output` is fsynced.
    ///
    /// Returns the new length of `output`. Running it again with the same
    /// arguments leaves the same bytes: that is how a crash during it is
    /// mended. The staged files must therefore outlive the append (keep
    /// them live in [`CheckpointDir::retain`] until it has returned).
    pub fn append_output(
        &self,
        output: &Path,
        len_before: u64,
        staged: &[StagedRef],
    ) -> Result<u64, StorageError> {
        let (exists, present) = match fs::metadata(output) {
            Ok(metadata) => (true, metadata.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (false, 0),
            Err(e) => return Err(StorageError::io("stat", output, None, e)),
        };
        if present < len_before {
            return Err(StorageError::CorruptFile {
                path: output.to_path_buf(),
                offset: present,
                damage: Damage::Short {
                    bytes_expected: len_before,
                    bytes_present: present,
                },
            });
        }
        let mut buffer = vec![0u8; STAGED_BUFFER_BYTES];
        let mut len_after = len_before;
        for file in staged {
            self.copy_staged(file, &mut buffer, |_, _| Ok(()))?;
            len_after = len_after.saturating_add(file.len);
        }

        let out = OpenOptions::new()
            .write(true)
            .create(len_before == 0)
            .truncate(false)
            .open(output)
            .map_err(|e| StorageError::io("open", output, None, e))?;
        if !exists {
            manifest::sync_parent_dir(output)?;
        }
        if present != len_before {
            out.set_len(len_before)
                .map_err(|e| StorageError::io("truncate", output, Some(len_before), e))?;
        }
        let mut position = len_before;
        for file in staged {
            let copied = self.copy_staged(file, &mut buffer, |offset, bytes| {
                out.write_all_at(bytes, position + offset)
                    .map_err(|e| StorageError::io("append to", output, Some(position + offset), e))
            });
            if let Err(error) = copied {
                // Leave the output as it was found rather than holding rows
                // that no manifest vouches for.
                let _ = out.set_len(len_before);
                return Err(error);
            }
            position += file.len;
        }
        debug_assert_eq!(position, len_after);
        out.sync_data()
            .map_err(|e| StorageError::io("fsync", output, Some(position), e))?;
        Ok(position)
    }

    /// Reads staged file `staged.file` through `buffer`, hands each piece
    /// with its offset to `sink`, and checks the length and crc32c. The file
    /// is read only up to `staged.len` bytes.
    fn copy_staged(
        &self,
        staged: &StagedRef,
        buffer: &mut [u8],
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        manifest::check_name(&staged.file)?;
        let path = self.staged.join(&staged.file);
        let file = File::open(&path).map_err(|e| StorageError::io("open", &path, None, e))?;
        let present = file
            .metadata()
            .map_err(|e| StorageError::io("stat", &path, None, e))?
            .len();
        if present != staged.len {
            let (offset, damage) = if present < staged.len {
                let damage = Damage::Short {
                    bytes_expected: staged.len,
                    bytes_present: present,
                };
                (present, damage)
            } else {
                let damage = Damage::Long {
                    bytes_expected: staged.len,
                    bytes_present: present,
                };
                (staged.len, damage)
            };
            return Err(StorageError::CorruptFile {
                path,
                offset,
                damage,
            });
        }
        let mut reader = file.take(staged.len);
        let mut offset = 0u64;
        let mut crc = 0u32;
        loop {
            let read = match reader.read(buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StorageError::io("read", &path, Some(offset), e)),
            };
            let bytes = &buffer[..read];
            crc = crc32c::crc32c_append(crc, bytes);
            sink(offset, bytes)?;
            offset += read as u64;
        }
        let damage = if offset != staged.len {
            // The file shrank after the stat.
            Damage::Short {
                bytes_expected: staged.len,
                bytes_present: offset,
            }
        } else if crc != staged.crc {
            Damage::Checksum {
                crc_expected: staged.crc,
                crc_actual: crc,
            }
        } else {
            return Ok(());
        };
        Err(StorageError::CorruptFile {
            path,
            offset: 0,
            damage,
        })
    }
}

/// Writes staged output rows through a buffer of [`STAGED_BUFFER_BYTES`],
/// keeping the length and a running crc32c of what it accepted.
/// [`StagedWriter::finish`] flushes, fsyncs and returns the [`StagedRef`].
///
/// A full buffer goes to the file with one positioned write at the offset
/// where the file's good bytes end. A write that fails with `ENOSPC`,
/// `EDQUOT` or `EIO` keeps the buffer and is tried again at the same offset
/// (so a short write is simply overwritten), backing off from 1 ms to
/// 250 ms, for at most [`CheckpointDir::staged_retry_for`]: a disk that
/// fills up stalls the writer (and, through its bounded spool, the sink)
/// instead of losing rows. [`StagedWriter::retried`] says what was retried.
/// Any other error, a disk full for longer, or a failed fsync (after which
/// the kernel may have dropped the dirty pages, so the bytes cannot be
/// trusted) is final: the writer refuses further writes and `finish`
/// reports the error. Dropped without `finish`, the file stays,
/// unreferenced, until [`CheckpointDir::retain`] removes it.
pub struct StagedWriter {
    name: String,
    path: PathBuf,
    file: File,
    buffer: Vec<u8>,
    /// Bytes of the file that hold accepted rows (the buffer goes after them).
    in_file: u64,
    len: u64,
    crc: u32,
    /// The first final error, replayed by later calls.
    failed: Option<(io::ErrorKind, Option<i32>)>,
    faults: Faults,
    retry_for: Duration,
    retried: Option<Retried>,
}

/// Writes of a staged file that failed and were tried again.
struct Retried {
    first_error: String,
    failures: u32,
    waited: Duration,
}

/// OS errors a staged write waits out: no space (`ENOSPC`), over quota
/// (`EDQUOT`), and `EIO`, which a filesystem may also return for a write it
/// could not allocate.
fn retryable(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(28 | 122 | 5))
}

impl StagedWriter {
    /// The staged file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes that failed and then succeeded when tried again, described
    /// (first error, failures, time waited); `None` if none failed.
    pub fn retried(&self) -> Option<String> {
        self.retried.as_ref().map(|r| {
            format!(
                "{}: {}; tried again {} time(s) over {} ms, then written",
                self.path.display(),
                r.first_error,
                r.failures,
                r.waited.as_millis()
            )
        })
    }

    /// Flushes, fsyncs the file and its directory, and returns the
    /// reference to store in the manifest. On error the file is removed.
    pub fn finish(mut self) -> Result<StagedRef, StorageError> {
        let finished = self.finish_file();
        if finished.is_err() {
            let _ = fs::remove_file(&self.path);
        }
        finished
    }

    fn finish_file(&mut self) -> Result<StagedRef, StorageError> {
        self.write_buffer()
            .map_err(|e| StorageError::io("write", &self.path, Some(self.in_file), e))?;
        // A short write that failed for good may have left bytes past the rows.
        self.file
            .set_len(self.in_file)
            .map_err(|e| StorageError::io("truncate", &self.path, Some(self.in_file), e))?;
        self.file
            .sync_all()
            .map_err(|e| StorageError::io("fsync", &self.path, None, e))?;
        manifest::sync_parent_dir(&self.path)?;
        Ok(StagedRef {
            file: self.name.clone(),
            len: self.len,
            crc: self.crc,
        })
    }

    /// Writes the buffer at the end of the good bytes, trying again while
    /// the error is one a full disk gives and the retry window lasts.
    fn write_buffer(&mut self) -> io::Result<()> {
        if let Some(failed) = self.failed {
            return Err(replay(failed));
        }
        if self.buffer.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut backoff = Duration::from_millis(1);
        loop {
            let written = match self.faults.check_staged_write() {
                // Injected: half the buffer lands, then the disk is full.
                Err(error) => self
                    .file
                    .write_all_at(&self.buffer[..self.buffer.len() / 2], self.in_file)
                    .and(Err(error)),
                Ok(()) => self.file.write_all_at(&self.buffer, self.in_file),
            };
            let error = match written {
                Ok(()) => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => error,
            };
            if !retryable(&error) || started.elapsed() >= self.retry_for {
                self.failed = Some((error.kind(), error.raw_os_error()));
                return Err(error);
            }
            let retried = self.retried.get_or_insert_with(|| Retried {
                first_error: error.to_string(),
                failures: 0,
                waited: Duration::ZERO,
            });
            retried.failures += 1;
            retried.waited += backoff;
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(STAGED_RETRY_BACKOFF_MAX);
        }
        self.in_file += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }
}

impl Write for StagedWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(failed) = self.failed {
            return Err(replay(failed));
        }
        if self.buffer.len() + bytes.len() > STAGED_BUFFER_BYTES {
            self.write_buffer()?;
        }
        let take = bytes.len().min(STAGED_BUFFER_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..take]);
        self.crc = crc32c::crc32c_append(self.crc, &bytes[..take]);
        self.len += take as u64;
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_buffer()
    }
}

/// An `io::Error` like the one kept by a failed [`StagedWriter`].
fn replay((kind, raw_os_error): (io::ErrorKind, Option<i32>)) -> io::Error {
    match raw_os_error {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(kind, "an earlier write to this staged file failed"),
    }
}

/// A chunk opened for reading, with its length at open.
struct OpenChunk {
    name: String,
    path: PathBuf,
    file: File,
    file_bytes: u64,
}

impl OpenChunk {
    fn open(dir: &Path, name: &str) -> Result<OpenChunk, StorageError> {
        manifest::check_name(name)?;
        let path = dir.join(name);
        let file = File::open(&path).map_err(|e| StorageError::io("open", &path, None, e))?;
        let file_bytes = file
            .metadata()
            .map_err(|e| StorageError::io("stat", &path, None, e))?
            .len();
        Ok(OpenChunk {
            name: name.to_string(),
            path,
            file,
            file_bytes,
        })
    }

    /// Reads `run`, parts adjacent in this chunk, with one `pread`.
    fn read_run(
        &self,
        run: &[PartRef],
        run_buffer: &mut Vec<u8>,
        bodies: &mut Vec<Vec<u8>>,
    ) -> Result<(), StorageError> {
        for part in run {
            self.check_extent(part)?;
        }
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(());
        };
        let run_bytes = (last.offset + last.frame_bytes() - first.offset) as usize;
        run_buffer.clear();
        run_buffer.resize(run_bytes, 0);
        self.file
            .read_exact_at(run_buffer, first.offset)
            .map_err(|e| StorageError::io("read", &self.path, Some(first.offset), e))?;
        let mut frames = &run_buffer[..];
        for part in run {
            let (frame, rest) = frames.split_at(part.frame_bytes() as usize);
            let (header, body) = frame.split_at(PART_HEADER_BYTES);
            self.check_header(part, header)?;
            self.check_body(part, body)?;
            bodies.push(body.to_vec());
            frames = rest;
        }
        Ok(())
    }

    /// Reads one large part with two `pread`s, the body straight into the
    /// result.
    fn read_alone(&self, part: &PartRef) -> Result<Vec<u8>, StorageError> {
        self.check_extent(part)?;
        let mut header = [0u8; PART_HEADER_BYTES];
        self.file
            .read_exact_at(&mut header, part.offset)
            .map_err(|e| StorageError::io("read", &self.path, Some(part.offset), e))?;
        self.check_header(part, &header)?;
        let mut body = vec![0u8; part.len as usize];
        let body_offset = part.offset + PART_HEADER_BYTES as u64;
        self.file
            .read_exact_at(&mut body, body_offset)
            .map_err(|e| StorageError::io("read", &self.path, Some(body_offset), e))?;
        self.check_body(part, &body)?;
        Ok(body)
    }

    /// The part's frame lies within the file and the part is within bounds.
    fn check_extent(&self, part: &PartRef) -> Result<(), StorageError> {
        if part.len as u64 > PART_BYTES_MAX {
            return Err(StorageError::FileTooLarge {
                path: self.path.clone(),
                file_bytes: part.len as u64,
                file_bytes_max: PART_BYTES_MAX,
            });
        }
        let bytes_present = self.file_bytes.saturating_sub(part.offset);
        if bytes_present < part.frame_bytes() {
            return Err(self.corrupt(
                part,
                Damage::Short {
                    bytes_expected: part.frame_bytes(),
                    bytes_present,
                },
            ));
        }
        Ok(())
    }

    fn check_header(&self, part: &PartRef, header: &[u8]) -> Result<(), StorageError> {
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let (magic, len, crc) = (word(0), word(4), word(8));
        let damage = if magic != PART_MAGIC {
            Damage::Magic {
                magic_expected: PART_MAGIC,
                magic_actual: magic,
            }
        } else if len != part.len {
            Damage::Field {
                field: "part length",
                expected: part.len as u64,
                actual: len as u64,
            }
        } else if crc != part.crc {
            Damage::Field {
                field: "part crc32c",
                expected: part.crc as u64,
                actual: crc as u64,
            }
        } else {
            return Ok(());
        };
        Err(self.corrupt(part, damage))
    }

    fn check_body(&self, part: &PartRef, body: &[u8]) -> Result<(), StorageError> {
        let crc_actual = crc32c::crc32c(body);
        if crc_actual != part.crc {
            return Err(self.corrupt(
                part,
                Damage::Checksum {
                    crc_expected: part.crc,
                    crc_actual,
                },
            ));
        }
        Ok(())
    }

    fn corrupt(&self, part: &PartRef, damage: Damage) -> StorageError {
        StorageError::CorruptFile {
            path: self.path.clone(),
            offset: part.offset,
            damage,
        }
    }
}

/// End (exclusive) of the run starting at `parts[first]`: following parts
/// of the same file, each starting where the previous frame ends, while the
/// run stays within [`READ_RUN_BYTES_MAX`]. A run holds at least one part.
fn run_end(parts: &[PartRef], first: usize) -> usize {
    let mut run_bytes = parts[first].frame_bytes();
    let mut end = first + 1;
    while let Some(next) = parts.get(end) {
        let previous = &parts[end - 1];
        let adjacent = next.file == previous.file
            && Some(next.offset) == previous.offset.checked_add(previous.frame_bytes());
        run_bytes += next.frame_bytes();
        if !adjacent || run_bytes > READ_RUN_BYTES_MAX as u64 {
            break;
        }
        end += 1;
    }
    end
}

/// Checks a manifest's frame (see the module header) and returns its body.
fn decode_manifest(path: &Path, epoch: u64, mut bytes: Vec<u8>) -> Result<Vec<u8>, StorageError> {
    let corrupt = |offset: u64, damage: Damage| StorageError::CorruptFile {
        path: path.to_path_buf(),
        offset,
        damage,
    };
    let file_bytes = bytes.len() as u64;
    if bytes.len() < MANIFEST_HEADER_BYTES {
        return Err(corrupt(
            0,
            Damage::Short {
                bytes_expected: MANIFEST_HEADER_BYTES as u64,
                bytes_present: file_bytes,
            },
        ));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let (magic, version, epoch_inside, body_len, crc) =
        (u32_at(0), u32_at(4), u64_at(8), u64_at(16), u32_at(24));
    let expected_bytes = (MANIFEST_HEADER_BYTES as u64).saturating_add(body_len);
    let damage = if magic != MANIFEST_MAGIC {
        Some((
            0,
            Damage::Magic {
                magic_expected: MANIFEST_MAGIC,
                magic_actual: magic,
            },
        ))
    } else if version != MANIFEST_FORMAT_VERSION {
        Some((
            4,
            Damage::Field {
                field: "manifest format version",
                expected: MANIFEST_FORMAT_VERSION as u64,
                actual: version as u64,
            },
        ))
    } else if epoch_inside != epoch {
        Some((
            8,
            Damage::Field {
                field: "epoch",
                expected: epoch,
                actual: epoch_inside,
            },
        ))
    } else if expected_bytes > file_bytes {
        Some((
            MANIFEST_HEADER_BYTES as u64,
            Damage::Short {
                bytes_expected: expected_bytes,
                bytes_present: file_bytes,
            },
        ))
    } else if expected_bytes < file_bytes {
        Some((
            expected_bytes,
            Damage::Long {
                bytes_expected: expected_bytes,
                bytes_present: file_bytes,
            },
        ))
    } else {
        None
    };
    if let Some((offset, damage)) = damage {
        return Err(corrupt(offset, damage));
    }
    let crc_actual = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[..24]),
        &bytes[MANIFEST_HEADER_BYTES..],
    );
    if crc_actual != crc {
        return Err(corrupt(
            0,
            Damage::Checksum {
                crc_expected: crc,
                crc_actual,
            },
        ));
    }
    bytes.drain(..MANIFEST_HEADER_BYTES);
    Ok(bytes)
}

fn manifest_name(epoch: u64) -> String {
    format!("{MANIFEST_PREFIX}{epoch:020}")
}

/// The epoch of a manifest file name: `MANIFEST-` and exactly 20 digits.
fn parse_manifest_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(MANIFEST_PREFIX)?;
    if digits.len() != EPOCH_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A chunk name: a plain file name (see [`manifest::check_name`]) that
/// cannot be taken for a manifest.
fn check_chunk_name(name: &str) -> Result<(), StorageError> {
    manifest::check_name(name)?;
    if name.starts_with(MANIFEST_PREFIX) {
        return Err(StorageError::InvalidName {
            name: name.to_string(),
            reason: "starts with 'MANIFEST-', reserved for manifests",
        });
    }
    Ok(())
}

/// The temp file [`manifest::commit_atomic`] uses for `name`; chunks use
/// the same, so that one rule covers the temp files of both.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp"))
}

/// Removes each plain file of `dir` for which `dead` holds (of its name, or
/// for a temp file `.<name>.tmp`, of `<name>`), then fsyncs `dir` if it
/// removed any. Entries are removed while listing, so nothing is collected.
fn remove_dead(dir: &Path, dead: impl Fn(&str) -> bool) -> Result<(), StorageError> {
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("list", dir, None, e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list", dir, None, e))?;
        let is_file = entry
            .file_type()
            .map_err(|e| StorageError::io("stat", entry.path(), None, e))?
            .is_file();
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let owner = name
            .strip_prefix('.')
            .and_then(|inner| inner.strip_suffix(".tmp"))
            .unwrap_or(name);
        if !is_file || !dead(owner) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("remove", &path, None, e)),
        }
    }
    if removed {
        manifest::sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;

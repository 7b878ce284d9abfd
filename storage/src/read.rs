//! Sequential reads of a byte range of a file, on a dedicated thread, through
//! io_uring: what a file source on a shard uses so that it never blocks.
//!
//! # Shape
//!
//! [`RangeReader::spawn`] starts one thread per range. The thread owns the file,
//! its own small io_uring (no registered buffers, so no locked memory) and a pool
//! of `ReadConfig::buffers` buffers of `ReadConfig::buffer_bytes` each. It fills
//! a free buffer with the next bytes of the range (one read in flight; short
//! reads are continued), sends it as a [`Chunk`] over a bounded channel, and
//! takes the next free buffer, waiting for the consumer to hand one back with
//! [`RangeReader::recycle`] once all are out. Memory is therefore bounded by
//! `buffers x buffer_bytes` per range, whatever the consumer does.
//!
//! The consumer side never blocks: [`RangeReader::try_next`] is a `try_recv`.
//!
//! # Ending
//!
//! The thread ends after sending [`Chunk::End`] (the range is read) or
//! [`Chunk::Failed`] (an I/O error, or the file ended before the range did: it
//! shrank), or as soon as the `RangeReader` is dropped (its next send or its
//! wait for a free buffer fails). It is not joined on drop, so dropping never
//! waits; [`RangeReader::stopped`] tells when it has gone.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

/// Buffers and their size for one range.
#[derive(Clone, Copy, Debug)]
pub struct ReadConfig {
    /// Bytes per read buffer (and per chunk handed out).
    pub buffer_bytes: usize,
    /// Buffers per range: at most this many chunks are out at once.
    pub buffers: usize,
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig {
            buffer_bytes: 1 << 20,
            buffers: 4,
        }
    }
}

/// What the reader thread hands over.
#[derive(Debug)]
pub enum Chunk {
    /// `bytes[..len]` are the file's bytes from `offset` on. Hand `bytes` back
    /// with [`RangeReader::recycle`].
    Data {
        offset: u64,
        bytes: Vec<u8>,
        len: usize,
    },
    /// The whole range has been handed out.
    End,
    /// Reading failed; the message names the file and the offset.
    Failed(String),
}

/// The consumer's end of one range being read (see the module header).
pub struct RangeReader {
    chunks: Receiver<Chunk>,
    recycle: Sender<Vec<u8>>,
    stopped: Arc<AtomicBool>,
    ended: bool,
}

/// Length of the file at `path` now, in bytes.
pub fn file_len(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

impl RangeReader {
    /// Starts reading `range` of the file at `path` on a new thread.
    pub fn spawn(
        path: &Path,
        range: Range<u64>,
        config: ReadConfig,
    ) -> Result<RangeReader, String> {
        assert!(
            config.buffers >= 1 && config.buffer_bytes >= 1,
            "{config:?}"
        );
        // At most `buffers` chunks plus the final End or Failed are ever queued,
        // so the thread's sends never wait.
        let (chunk_tx, chunks) = mpsc::sync_channel(config.buffers + 1);
        let (recycle, recycle_rx) = mpsc::channel();
        let stopped = Arc::new(AtomicBool::new(false));
        let job = ReadJob {
            path: path.to_path_buf(),
            range,
            config,
            chunks: chunk_tx,
            recycled: recycle_rx,
        };
        let flag = stopped.clone();
        std::thread::Builder::new()
            .name("dirigo-read".into())
            .spawn(move || {
                job.run();
                flag.store(true, Ordering::Release);
            })
            .map_err(|e| format!("cannot start a reader thread for {}: {e}", path.display()))?;
        Ok(RangeReader {
            chunks,
            recycle,
            stopped,
            ended: false,
        })
    }

    /// The next chunk if one is ready; `None` if not yet. Never blocks.
    pub fn try_next(&mut self) -> Option<Chunk> {
        if self.ended {
            return Some(Chunk::End);
        }
        match self.chunks.try_recv() {
            Ok(chunk) => {
                self.ended = matches!(chunk, Chunk::End | Chunk::Failed(_));
                Some(chunk)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.ended = true;
                Some(Chunk::Failed("the reader thread ended unexpectedly".into()))
            }
        }
    }

    /// Hands a chunk's buffer back for the next read.
    pub fn recycle(&mut self, bytes: Vec<u8>) {
        // The thread may have finished; the buffer is then simply freed.
        let _ = self.recycle.send(bytes);
    }

    /// Set once the reader thread has exited.
    pub fn stopped(&self) -> Arc<AtomicBool> {
        self.stopped.clone()
    }
}

struct ReadJob {
    path: PathBuf,
    range: Range<u64>,
    config: ReadConfig,
    chunks: SyncSender<Chunk>,
    recycled: Receiver<Vec<u8>>,
}

impl ReadJob {
    fn run(self) {
        let (file, mut ring) = match open(&self.path) {
            Ok(opened) => opened,
            Err(e) => {
                let _ = self.chunks.send(Chunk::Failed(e));
                return;
            }
        };
        let mut allocated = 0;
        let mut offset = self.range.start;
        while offset < self.range.end {
            let mut bytes = if allocated < self.config.buffers {
                allocated += 1;
                vec![0u8; self.config.buffer_bytes]
            } else {
                match self.recycled.recv() {
                    Ok(bytes) => bytes,
                    Err(_) => return, // the consumer is gone
                }
            };
            let want = (self.range.end - offset).min(bytes.len() as u64) as usize;
            let chunk = match read_exact_at(&mut ring, &file, &mut bytes[..want], offset) {
                Ok(()) => Chunk::Data {
                    offset,
                    bytes,
                    len: want,
                },
                Err(e) => Chunk::Failed(format!("cannot read {}: {e}", self.path.display())),
            };
            let failed = matches!(chunk, Chunk::Failed(_));
            if self.chunks.send(chunk).is_err() || failed {
                return;
            }
            offset += want as u64;
        }
        let _ = self.chunks.send(Chunk::End);
    }
}

fn open(path: &Path) -> Result<(File, IoUring), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let ring = IoUring::new(4).map_err(|e| format!("cannot set up io_uring: {e}"))?;
    Ok((file, ring))
}

/// Fills `buf` with the file's bytes from `offset`, continuing short reads.
fn read_exact_at(
    ring: &mut IoUring,
    file: &File,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), String> {
    let mut filled = 0;
    while filled < buf.len() {
        let at = offset + filled as u64;
        let rest = &mut buf[filled..];
        let len = rest.len().min(u32::MAX as usize) as u32;
        let read = opcode::Read::new(types::Fd(file.as_raw_fd()), rest.as_mut_ptr(), len)
            .offset(at)
            .build();
        // SAFETY: `rest` and `file` outlive the operation: we wait for its
        // completion below before touching either again.
        unsafe {
            ring.submission()
                .push(&read)
                .map_err(|_| "io_uring submission queue full".to_string())?;
        }
        ring.submit_and_wait(1)
            .map_err(|e| format!("io_uring wait failed at byte {at}: {e}"))?;
        let result = ring
            .completion()
            .next()
            .ok_or_else(|| format!("io_uring gave no completion at byte {at}"))?
            .result();
        match result {
            n if n > 0 => filled += n as usize,
            0 => {
                return Err(format!(
                    "the file ended at byte {at}, but {} bytes were planned: it shrank",
                    offset + buf.len() as u64
                ))
            }
            e if -e == libc_eintr() || -e == libc_eagain() => continue,
            e => {
                return Err(format!(
                    "at byte {at}: {}",
                    std::io::Error::from_raw_os_error(-e)
                ))
            }
        }
    }
    Ok(())
}

const fn libc_eintr() -> i32 {
    4
}

const fn libc_eagain() -> i32 {
    11
}

/// Counts the line ends (`'\n'`) in the first `end` bytes of the file, on a
/// thread of its own; the answer arrives on the returned channel. (A file
/// source needs it only to name the absolute line of an error in a range that
/// starts mid-file, so it is computed then, not planned up front.)
pub fn count_newlines(path: &Path, end: u64) -> Receiver<Result<u64, String>> {
    let (tx, rx) = mpsc::sync_channel(1);
    let path = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("dirigo-count".into())
        .spawn({
            let tx = tx.clone();
            move || {
                let _ = tx.send(count_newlines_now(&path, end));
            }
        });
    if let Err(e) = spawned {
        let _ = tx.send(Err(format!("cannot start a thread: {e}")));
    }
    rx
}

fn count_newlines_now(path: &Path, end: u64) -> Result<u64, String> {
    let (file, mut ring) = open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    let mut count = 0;
    while offset < end {
        let want = (end - offset).min(buf.len() as u64) as usize;
        read_exact_at(&mut ring, &file, &mut buf[..want], offset)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        count += memchr::memchr_iter(b'\n', &buf[..want]).count() as u64;
        offset += want as u64;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("dirigo-read-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn drain(reader: &mut RangeReader) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "reader made no progress");
            match reader.try_next() {
                None => std::thread::yield_now(),
                Some(Chunk::Data { offset, bytes, len }) => {
                    assert_eq!(offset as usize, out.len() + 3);
                    out.extend_from_slice(&bytes[..len]);
                    reader.recycle(bytes);
                }
                Some(Chunk::End) => return Ok(out),
                Some(Chunk::Failed(e)) => return Err(e),
            }
        }
    }

    #[test]
    fn range_reader_reads_the_range_in_order_with_few_buffers() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let path = temp_file("order", &data);
        let config = ReadConfig {
            buffer_bytes: 4096,
            buffers: 2,
        };
        let mut reader = RangeReader::spawn(&path, 3..99_990, config).unwrap();
        assert_eq!(drain(&mut reader).unwrap(), &data[3..99_990]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn range_reader_reports_a_file_that_shrank() {
        let path = temp_file("shrank", &[b'x'; 1000]);
        let mut reader = RangeReader::spawn(&path, 3..5000, ReadConfig::default()).unwrap();
        let err = drain(&mut reader).unwrap_err();
        assert!(
            err.contains("shrank") && err.contains(&*path.to_string_lossy()),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn range_reader_thread_stops_when_dropped() {
        let path = temp_file("drop", &vec![b'x'; 1 << 20]);
        let config = ReadConfig {
            buffer_bytes: 1024,
            buffers: 2,
        };
        let reader = RangeReader::spawn(&path, 0..(1 << 20), config).unwrap();
        let stopped = reader.stopped();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!stopped.load(Ordering::Acquire), "waits for a free buffer");
        drop(reader);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stopped.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "reader thread still running");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn count_newlines_counts_a_prefix() {
        let path = temp_file("count", b"a\nb\r\n\n\ncd\n");
        assert_eq!(count_newlines(&path, 5).recv().unwrap(), Ok(2));
        assert_eq!(count_newlines(&path, 10).recv().unwrap(), Ok(5));
        std::fs::remove_file(path).unwrap();
    }
}

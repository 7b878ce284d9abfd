//! `Spool`: a writer on a thread of its own, fed through a bounded hand-off, so
//! that the shard producing output never makes a write system call itself.
//!
//! A sink formats its rows into a buffer and hands the buffer over
//! ([`Spool::write`]); the spool's thread writes buffers in the order they came
//! and sends each back for reuse. At most `buffers_max` buffers are in flight: a
//! producer faster than the disk waits for the spool (back-pressure: the one
//! wait a shard's sink can have, besides the last flush in `finish`), memory
//! stays bounded. The first write error is kept; later writes are dropped and
//! [`Spool::finish`] (or [`Spool::error`]) reports it with the target's name.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Buffers in flight between a producer and its spool thread, by default.
pub const SPOOL_BUFFERS_MAX: usize = 8;

pub struct Spool {
    target: String,
    full: Option<SyncSender<Vec<u8>>>,
    empty: Receiver<Vec<u8>>,
    error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Spool {
    /// Start a spool writing to `out`; `target` names it in errors.
    pub fn new(out: Box<dyn Write + Send>, target: &str, buffers_max: usize) -> Spool {
        let buffers_max = buffers_max.max(1);
        let (full, filled) = sync_channel::<Vec<u8>>(buffers_max);
        let (returned, empty) = sync_channel::<Vec<u8>>(buffers_max);
        let error = Arc::new(Mutex::new(None));
        let thread_error = error.clone();
        let name = target.to_string();
        let thread = std::thread::Builder::new()
            .name("dirigo-spool".into())
            .spawn(move || write_all(out, filled, returned, thread_error, name))
            .expect("a spool thread starts");
        Spool {
            target: target.to_string(),
            full: Some(full),
            empty,
            error,
            thread: Some(thread),
        }
    }

    /// An empty buffer to fill: one the spool has written, or a new one.
    pub fn buffer(&self) -> Vec<u8> {
        self.empty.try_recv().unwrap_or_default()
    }

    /// Hand `buffer` over to be written; waits only while `buffers_max` buffers
    /// are already in flight.
    pub fn write(&mut self, buffer: Vec<u8>) {
        if buffer.is_empty() || self.error().is_some() {
            return;
        }
        if let Some(full) = &self.full {
            // The thread only stops early on an error, which is kept for `finish`.
            let _ = full.send(buffer);
        }
    }

    /// The first write error, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().expect("spool error lock").clone()
    }

    /// Write what is in flight, flush, stop the thread; the first error if any.
    pub fn finish(&mut self) -> Result<(), String> {
        drop(self.full.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                return Err(format!("the writer of {} panicked", self.target));
            }
        }
        match self.error() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn write_all(
    mut out: Box<dyn Write + Send>,
    filled: Receiver<Vec<u8>>,
    returned: SyncSender<Vec<u8>>,
    error: Arc<Mutex<Option<String>>>,
    target: String,
) {
    let fail = |e: std::io::Error| {
        let mut slot = error.lock().expect("spool error lock");
        slot.get_or_insert(format!("cannot write to {target}: {e}"));
    };
    for mut buffer in filled.iter() {
        if let Err(e) = out.write_all(&buffer) {
            fail(e);
            return;
        }
        buffer.clear();
        let _ = returned.try_send(buffer);
    }
    if let Err(e) = out.flush() {
        fail(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records what reached it, or fails after `fail_after` bytes.
    struct Recorder {
        seen: Arc<Mutex<Vec<u8>>>,
        fail_after: usize,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut seen = self.seen.lock().unwrap();
            if seen.len() + buf.len() > self.fail_after {
                return Err(std::io::Error::other("disk full"));
            }
            seen.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffers_are_written_in_order_and_errors_are_kept() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            seen: seen.clone(),
            fail_after: usize::MAX,
        };
        let mut spool = Spool::new(Box::new(recorder), "memory", 2);
        for i in 0..100u8 {
            let mut buffer = spool.buffer();
            buffer.extend_from_slice(&[i, i]);
            spool.write(buffer);
        }
        spool.finish().expect("no error");
        let expected: Vec<u8> = (0..100u8).flat_map(|i| [i, i]).collect();
        assert_eq!(*seen.lock().unwrap(), expected);

        let failing = Recorder {
            seen: Arc::new(Mutex::new(Vec::new())),
            fail_after: 10,
        };
        let mut spool = Spool::new(Box::new(failing), "the disk", 2);
        for _ in 0..20 {
            spool.write(vec![1; 4]);
        }
        let error = spool.finish().expect_err("the write fails");
        assert!(
            error.contains("the disk") && error.contains("disk full"),
            "{error}"
        );
    }
}

//! Keyed readings for the dataflow tests: a source of `(key, time_ms)`
//! readings numbered from 0, split over source partitions, a sink that
//! collects `(key, window_start, count)` rows, and the plain count of tumbling
//! windows the rows must equal.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use dirigo_engine::dataflow::{Job, Sink, Source, SourceBatch, Stream};

pub const WINDOW_MS: i64 = 100;
pub const KEYS: u64 = 1000;

/// Reading `n`: a key spread over `KEYS`, and a time that rises by 1 ms every
/// 100 readings.
pub fn reading(n: u64) -> (u64, i64) {
    let mix = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    (mix % KEYS, (n / 100) as i64)
}

/// Readings `next, next + step, ...` below `end`: partition `p` of `n` starts
/// at `p` with step `n`.
pub struct Readings {
    pub next: u64,
    pub step: u64,
    pub end: u64,
}

impl Source<(u64, i64)> for Readings {
    fn next_batch(&mut self, max: usize, out: &mut Vec<(u64, i64)>) -> SourceBatch {
        for _ in 0..max {
            if self.next >= self.end {
                return SourceBatch::Done;
            }
            out.push(reading(self.next));
            self.next += self.step;
        }
        SourceBatch::More {
            watermark_ms: reading(self.next - self.step).1,
        }
    }
    fn position(&self) -> Option<Vec<u8>> {
        Some(self.next.to_le_bytes().to_vec())
    }
    fn seek(&mut self, position: &[u8]) -> Result<(), String> {
        let bytes: [u8; 8] = position.try_into().map_err(|_| "not 8 bytes")?;
        self.next = u64::from_le_bytes(bytes);
        Ok(())
    }
}

/// A source stage "readings" of 2 partitions giving readings `0..events`.
pub fn source(job: &mut Job, events: u64) -> Stream<(u64, i64)> {
    job.source(
        "readings",
        2,
        Arc::new(move |p, n| {
            Box::new(Readings {
                next: p as u64,
                step: n as u64,
                end: events,
            })
        }),
    )
}

pub type Rows = Arc<Mutex<Vec<(u64, i64, u64)>>>;

pub struct Collect(pub Rows);

impl Sink<(u64, i64, u64)> for Collect {
    fn write(&mut self, records: &[(u64, i64, u64)]) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
}

/// Per key and tumbling window of `WINDOW_MS`, the readings among the first
/// `events`, sorted.
pub fn reference(events: u64) -> Vec<(u64, i64, u64)> {
    let mut counts = BTreeMap::new();
    for n in 0..events {
        let (key, time) = reading(n);
        *counts
            .entry((key, time - time.rem_euclid(WINDOW_MS)))
            .or_insert(0u64) += 1;
    }
    counts.into_iter().map(|((k, s), n)| (k, s, n)).collect()
}

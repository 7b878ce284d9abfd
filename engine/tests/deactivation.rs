//! Scale to zero in the threaded runtime: an idle dataflow actor with nothing of
//! its own to lose is deactivated mid-job and made anew when input comes; one
//! that owns state the engine cannot save (a sink buffering its rows) stays
//! until its input ends; a window operator goes with its key groups and comes
//! back with them. All deliver every row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job, Sink, Source, SourceBatch};

const EVENTS: u64 = 100;

/// One number per call, so that a paced source makes one small batch at a time.
struct Numbers {
    next: u64,
}

impl Source<u64> for Numbers {
    fn next_batch(&mut self, _max: usize, out: &mut Vec<u64>) -> SourceBatch {
        if self.next >= EVENTS {
            return SourceBatch::Done;
        }
        out.push(self.next);
        self.next += 1;
        SourceBatch::More {
            watermark_ms: self.next as i64 - 1,
        }
    }
}

/// Appends straight to shared storage: a fresh one does the same.
struct Shared(Arc<Mutex<Vec<u64>>>);

impl Sink<u64> for Shared {
    fn write(&mut self, records: &[u64]) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
    fn stateless(&self) -> bool {
        true
    }
}

/// Keeps its rows until the end of input: losing it mid-job would lose rows.
struct Buffering {
    held: Vec<u64>,
    out: Arc<Mutex<Vec<u64>>>,
}

impl Sink<u64> for Buffering {
    fn write(&mut self, records: &[u64]) {
        self.held.extend_from_slice(records);
    }
    fn finish(&mut self) {
        self.out.lock().unwrap().append(&mut self.held);
    }
}

#[test]
fn idle_stateless_actors_come_and_go_and_stateful_ones_stay() {
    let mut config = DataflowConfig::default();
    config.runtime.shards = 1;
    config.runtime.housekeeping_interval = Duration::from_millis(1);
    config.runtime.shard.idle_timeout_ns = Some(2_000_000);
    let mut dataflow = Dataflow::start(config).expect("engine starts");

    let shared_rows = Arc::new(Mutex::new(Vec::new()));
    let buffered_rows = Arc::new(Mutex::new(Vec::new()));
    let shared_made = Arc::new(AtomicU64::new(0));
    let buffering_made = Arc::new(AtomicU64::new(0));
    let mut job = Job::new("idle", Duration::from_millis(50));
    // One number every 5 ms: each sink idles past the 2 ms timeout between rows.
    job.rate(Some(200));
    let numbers = job.source("numbers", 1, Arc::new(|_, _| Box::new(Numbers { next: 0 })));
    let (rows, made) = (shared_rows.clone(), shared_made.clone());
    numbers.sink(
        "shared",
        1,
        Arc::new(move |_| {
            made.fetch_add(1, Ordering::Relaxed);
            Box::new(Shared(rows.clone()))
        }),
    );
    let (rows, made) = (buffered_rows.clone(), buffering_made.clone());
    numbers.sink(
        "buffering",
        1,
        Arc::new(move |_| {
            made.fetch_add(1, Ordering::Relaxed);
            Box::new(Buffering {
                held: Vec::new(),
                out: rows.clone(),
            })
        }),
    );
    let handle = dataflow.submit(job).expect("submits");
    handle.wait(Duration::from_secs(30)).expect("the job ends");
    let expected: Vec<u64> = (0..EVENTS).collect();
    assert_eq!(*shared_rows.lock().unwrap(), expected);
    assert_eq!(
        *buffered_rows.lock().unwrap(),
        expected,
        "no buffered row lost"
    );
    assert_eq!(
        buffering_made.load(Ordering::Relaxed),
        1,
        "the buffering sink was never deactivated mid-job"
    );
    let shared_made = shared_made.load(Ordering::Relaxed);
    assert!(
        shared_made > 5,
        "the stateless sink came and went only {shared_made} times"
    );
    let deactivations: u64 = dataflow
        .stats()
        .shards
        .iter()
        .map(|s| s.deactivations)
        .sum();
    assert!(
        deactivations >= shared_made - 1,
        "{deactivations} deactivations"
    );
    dataflow.shutdown();
}

/// A keyed window count whose partition idles between paced records: it goes
/// to the store with its open windows (its key groups) and comes back with
/// them, mid-job, many times; the counts are exact.
#[test]
fn an_idle_window_operator_deactivates_with_its_state_and_comes_back_exact() {
    use dirigo_engine::dataflow::ops::{Count, WindowAggregate, WindowSpec};

    let mut config = DataflowConfig::default();
    config.runtime.shards = 1;
    config.runtime.housekeeping_interval = Duration::from_millis(1);
    config.runtime.shard.idle_timeout_ns = Some(2_000_000);
    let mut dataflow = Dataflow::start(config).expect("engine starts");

    let rows = Arc::new(Mutex::new(Vec::new()));
    let made = Arc::new(AtomicU64::new(0));
    let mut job = Job::new("idle-window", Duration::from_millis(50));
    job.rate(Some(200)); // one number every 5 ms
    let count = WindowAggregate::new(
        WindowSpec::Tumbling { size_ms: 10 },
        |n: &u64| *n as i64,
        |n: &u64| n % 3,
        Count::new(|key, (start, _), n| (key, start, n)),
    )
    .factory();
    let counted = made.clone();
    let out = rows.clone();
    job.source("numbers", 1, Arc::new(|_, _| Box::new(Numbers { next: 0 })))
        .key_by(|n: &u64| n % 3)
        .process(
            "count",
            1,
            Arc::new(move |p| {
                counted.fetch_add(1, Ordering::Relaxed);
                count(p)
            }),
        )
        .sink("rows", 1, Arc::new(move |_| Box::new(Rows(out.clone()))));
    let handle = dataflow.submit(job).expect("submits");
    handle.wait(Duration::from_secs(30)).expect("the job ends");
    let mut expected = Vec::new();
    for start in (0..EVENTS as i64).step_by(10) {
        for key in 0..3u64 {
            let n = (start..start + 10).filter(|n| *n as u64 % 3 == key).count() as u64;
            expected.push((key, start, n));
        }
    }
    expected.sort();
    let mut got = rows.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, expected);
    let made = made.load(Ordering::Relaxed);
    assert!(
        made > 5,
        "the window operator came back with its state only {made} times"
    );
    dataflow.shutdown();
}

/// Rows of the window count, straight to shared storage (stateless).
struct Rows(Arc<Mutex<Vec<(u64, i64, u64)>>>);

impl Sink<(u64, i64, u64)> for Rows {
    fn write(&mut self, records: &[(u64, i64, u64)]) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
    fn stateless(&self) -> bool {
        true
    }
}

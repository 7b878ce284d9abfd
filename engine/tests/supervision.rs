//! Supervision of dataflow jobs: a panic in a job's source, operator or sink ends
//! that job within a second with an error naming the job, the stage, the
//! partition and the panic message, while a second job on the same shards runs
//! to its exact result.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirigo_engine::dataflow::state::{KeyedState, Stateful};
use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job, Operator, Sink, Source, SourceBatch};

/// Numbers `0..n` as two partitions; watermark = the last number.
struct Numbers {
    next: u64,
    step: u64,
    n: u64,
    /// Panic when producing this number.
    bomb: Option<u64>,
}

impl Source<u64> for Numbers {
    fn next_batch(&mut self, max: usize, out: &mut Vec<u64>) -> SourceBatch {
        for _ in 0..max.min(16) {
            if self.next >= self.n {
                return SourceBatch::Done;
            }
            if Some(self.next) == self.bomb {
                panic!("source bomb at {}", self.next);
            }
            out.push(self.next);
            self.next += self.step;
        }
        SourceBatch::More {
            watermark_ms: (self.next - self.step) as i64,
        }
    }
}

/// Sums per key; emits `(key, sum)` at the end. Panics on `bomb`.
struct Sum {
    sums: KeyedState<u64>,
    bomb: Option<u64>,
}

impl Operator<u64, (u64, u64)> for Sum {
    fn on_records(&mut self, records: Vec<u64>, _out: &mut Vec<(u64, u64)>) {
        for r in records {
            if Some(r) == self.bomb {
                panic!("operator bomb at {r}");
            }
            *self.sums.for_key(r % 10).entry(r % 10).or_default() += r;
        }
    }
    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<(u64, u64)>) {
        if watermark_ms == i64::MAX {
            for (_, sums) in self.sums.iter() {
                out.extend(sums.iter().map(|(&k, &v)| (k, v)));
            }
        }
    }
    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.sums)
    }
}

struct Collect {
    rows: Arc<Mutex<Vec<(u64, u64)>>>,
    bomb: bool,
}

impl Sink<(u64, u64)> for Collect {
    fn write(&mut self, records: &[(u64, u64)]) {
        if self.bomb {
            panic!("sink bomb with {} rows", records.len());
        }
        self.rows.lock().unwrap().extend_from_slice(records);
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Bomb {
    None,
    Source,
    Operator,
    Sink,
}

fn job(name: &str, n: u64, bomb: Bomb, rows: Arc<Mutex<Vec<(u64, u64)>>>) -> Job {
    let mut job = Job::new(name, Duration::from_millis(50));
    // Paced, so that the healthy job is still running when the other one fails.
    job.rate(Some(200_000));
    let source_bomb = (bomb == Bomb::Source).then_some(n / 2);
    let operator_bomb = (bomb == Bomb::Operator).then_some(n / 2 + 1);
    job.source(
        "numbers",
        2,
        Arc::new(move |p, parts| {
            Box::new(Numbers {
                next: p as u64,
                step: parts as u64,
                n,
                bomb: source_bomb,
            })
        }),
    )
    .key_by(|r| r % 10)
    .process(
        "sum",
        3,
        Arc::new(move |_| {
            Box::new(Sum {
                sums: Default::default(),
                bomb: operator_bomb,
            })
        }),
    )
    .sink(
        "collect",
        1,
        Arc::new(move |_| {
            Box::new(Collect {
                rows: rows.clone(),
                bomb: bomb == Bomb::Sink,
            })
        }),
    );
    job
}

#[test]
fn a_panic_ends_its_job_with_a_clear_error_and_spares_the_others() {
    let cases = [
        (Bomb::Source, "stage numbers", "source bomb at"),
        (Bomb::Operator, "stage sum", "operator bomb at"),
        (Bomb::Sink, "stage collect", "sink bomb with"),
    ];
    let mut config = DataflowConfig::default();
    config.runtime.shards = 2;
    config.runtime.oversubscribe = true;
    let mut dataflow = Dataflow::start(config).expect("engine starts");
    for (bomb, stage, message) in cases {
        let healthy_rows = Arc::new(Mutex::new(Vec::new()));
        let n = 40_000;
        // About 1 s of paced input: still running when the doomed job fails
        // (its sink sees rows only at its end of input, about 0.2 s in).
        let healthy_n = 200_000;
        let healthy = dataflow
            .submit(job("healthy", healthy_n, Bomb::None, healthy_rows.clone()))
            .expect("submits");
        let failing = dataflow
            .submit(job("doomed", n, bomb, Arc::default()))
            .expect("submits");
        // The bomb goes off at most 0.2 s in (n events at 200k/s).
        let started = Instant::now();
        let error = dataflow
            .wait(&failing, Duration::from_secs(30))
            .err()
            .unwrap_or_else(|| panic!("{bomb:?}: the doomed job fails"));
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(200 + 1_000),
            "{bomb:?}: the error came after {took:?}"
        );
        for part in ["job doomed", stage, "partition", message] {
            assert!(error.contains(part), "{bomb:?}: {error:?} lacks {part:?}");
        }
        assert!(
            !healthy.is_done(),
            "{bomb:?}: the healthy job should still be running when the other fails"
        );
        dataflow
            .wait(&healthy, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{bomb:?}: the healthy job: {e}"));
        let mut rows = healthy_rows.lock().unwrap().clone();
        rows.sort();
        let expected: Vec<(u64, u64)> = (0..10)
            .map(|k| (k, (0..healthy_n).filter(|x| x % 10 == k).sum()))
            .collect();
        assert_eq!(rows, expected, "{bomb:?}: the healthy job's sums");
    }
    let stats = dataflow.stats();
    let failures: u64 = stats.shards.iter().map(|s| s.failures).sum();
    assert!(failures >= 3, "{failures} actor failures counted");
    // `wait` retired every job, failed or not: no plan and no actor is left.
    assert_eq!(dataflow.jobs(), 0, "plans of retired jobs are gone");
    let actors: usize = stats.shards.iter().map(|s| s.actors.len()).sum();
    assert_eq!(actors, 0, "actors of retired jobs are gone");
    dataflow.shutdown();
}

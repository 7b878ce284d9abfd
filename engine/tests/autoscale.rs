//! The autoscaler in a running engine: every actor of a job packed onto one
//! shard at full speed, the autoscaler spreads them, the output stays exactly
//! the reference's; a job with scaling off beside it is never moved.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirigo_engine::autoscale::Action;
use dirigo_engine::dataflow::ops::{Count, WindowSpec};
use dirigo_engine::dataflow::{
    AutoscaleOptions, Dataflow, DataflowConfig, Job, Sink, Source, SourceBatch,
};
use dirigo_engine::ShardId;

const EVENTS: u64 = 3_000_000;
const WINDOW_MS: i64 = 100;
const KEYS: u64 = 1000;

fn reading(n: u64) -> (u64, i64) {
    let mix = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    (mix % KEYS, (n / 100) as i64)
}

struct Readings {
    next: u64,
    step: u64,
}

impl Source<(u64, i64)> for Readings {
    fn next_batch(&mut self, max: usize, out: &mut Vec<(u64, i64)>) -> SourceBatch {
        for _ in 0..max {
            if self.next >= EVENTS {
                return SourceBatch::Done;
            }
            out.push(reading(self.next));
            self.next += self.step;
        }
        SourceBatch::More {
            watermark_ms: reading(self.next - self.step).1,
        }
    }
}

type Rows = Arc<Mutex<Vec<(u64, i64, u64)>>>;

struct Collect(Rows);

impl Sink<(u64, i64, u64)> for Collect {
    fn write(&mut self, records: &[(u64, i64, u64)]) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
}

fn job(name: &str, rows: Rows) -> Job {
    let mut job = Job::new(name, Duration::from_millis(200));
    job.source(
        "readings",
        2,
        Arc::new(|p, n| {
            Box::new(Readings {
                next: p as u64,
                step: n as u64,
            })
        }),
    )
    .key_by(|r: &(u64, i64)| r.0)
    .window_aggregate(
        "count",
        4,
        WindowSpec::Tumbling { size_ms: WINDOW_MS },
        |r| r.1,
        |r| r.0,
        Count::new(|key, (start, _), n| (key, start, n)),
    )
    .sink("out", 2, Arc::new(move |_| Box::new(Collect(rows.clone()))));
    job
}

fn reference() -> Vec<(u64, i64, u64)> {
    let mut counts = BTreeMap::new();
    for n in 0..EVENTS {
        let (key, time) = reading(n);
        *counts
            .entry((key, time - time.rem_euclid(WINDOW_MS)))
            .or_insert(0u64) += 1;
    }
    counts.into_iter().map(|((k, s), n)| (k, s, n)).collect()
}

#[test]
fn the_autoscaler_spreads_a_job_packed_on_one_shard_and_its_output_stays_exact() {
    let expected = reference();
    let mut config = DataflowConfig::default();
    config.runtime.shards = 2;
    config.runtime.oversubscribe = true;
    config.autoscale = Some(AutoscaleOptions {
        interval: Duration::from_millis(20),
        ..AutoscaleOptions::default()
    });
    let mut dataflow = Dataflow::start(config).unwrap();
    let (moving, fixed): (Rows, Rows) = Default::default();
    let mut pinned = job("pinned", fixed.clone());
    pinned.autoscale(false);
    let pinned = dataflow.submit(pinned).unwrap();
    let handle = dataflow.submit(job("scaled", moving.clone())).unwrap();
    // Every actor of both jobs on shard 0: it is overloaded, shard 1 idle.
    for actor in dataflow
        .actors(handle.id)
        .into_iter()
        .chain(dataflow.actors(pinned.id))
    {
        dataflow.migrate(actor, ShardId(0));
    }
    let report = dataflow.wait(&handle, Duration::from_secs(120)).unwrap();
    let pinned_report = dataflow.wait(&pinned, Duration::from_secs(120)).unwrap();
    let decisions = dataflow.decisions();
    dataflow.shutdown();

    let moves: Vec<_> = decisions
        .iter()
        .filter_map(|d| match d.action {
            Action::Move {
                actor, from, to, ..
            } => Some((actor, from, to)),
            _ => None,
        })
        .collect();
    assert!(
        moves
            .iter()
            .any(|&(a, from, to)| a.job == handle.id && from == ShardId(0) && to == ShardId(1)),
        "the scaled job's actors are spread: {decisions:#?}"
    );
    assert!(
        moves.iter().all(|(a, _, _)| a.job != pinned.id),
        "the pinned job is never moved: {decisions:#?}"
    );
    // The report is read when the job ends; the log runs on until it is
    // retired, and a step can fall in between.
    let scaled = moves.iter().filter(|(a, _, _)| a.job == handle.id).count() as u64;
    assert!(
        report.scale_actions >= 1 && report.scale_actions <= scaled,
        "{} counted, {scaled} logged",
        report.scale_actions
    );
    assert_eq!(pinned_report.scale_actions, 0);
    for d in &decisions {
        assert!(d.reason.contains("load"), "every decision says why: {d}");
    }
    for rows in [moving, fixed] {
        let mut rows = rows.lock().unwrap().clone();
        rows.sort();
        assert_eq!(rows, expected, "exact output, moved or not");
    }
}

//! Relays: the stateless steps fused into a stage of fewer partitions than
//! shards split out of it onto a relay stage, and fused back, while the job
//! runs. A source of one partition feeds a costly step, then a windowed count
//! (a mergeable aggregate, which takes its input in any order) and, on a
//! second branch, a sink of the raw readings. Switched at random while
//! actors move, or by the autoscaler when the source's shard is overloaded,
//! the rows stay exactly the reference's, and records are seen to have been
//! mapped on another thread than the one their source produced them on
//! (a fused step runs in the source's own turn).

#[path = "common/readings.rs"]
mod readings;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirigo_engine::autoscale::Action;
use dirigo_engine::dataflow::ops::{Count, WindowSpec};
use dirigo_engine::dataflow::{
    AutoscaleOptions, Dataflow, DataflowConfig, Job, Sink, Source, SourceBatch,
};
use dirigo_engine::runtime::sim::SimRng;
use dirigo_engine::ShardId;
use readings::{reading, reference, Collect, Rows, WINDOW_MS};

/// A number for each thread that asks, the same each time it asks.
fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|tag| *tag)
}

/// Readings `0..end` numbered, each tagged with the thread that made it.
struct Tagged {
    next: u64,
    end: u64,
}

impl Source<(u64, u64)> for Tagged {
    fn next_batch(&mut self, max: usize, out: &mut Vec<(u64, u64)>) -> SourceBatch {
        let tag = thread_tag();
        for _ in 0..max {
            if self.next >= self.end {
                return SourceBatch::Done;
            }
            out.push((self.next, tag));
            self.next += 1;
        }
        SourceBatch::More {
            watermark_ms: reading(self.next - 1).1,
        }
    }
}

/// The numbers of the readings a sink took.
struct Numbers(Arc<Mutex<Vec<u64>>>);

impl Sink<u64> for Numbers {
    fn write(&mut self, records: &[u64]) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
}

struct Outputs {
    rows: Rows,
    numbers: Arc<Mutex<Vec<u64>>>,
    /// Records mapped on another thread than their source's.
    elsewhere: Arc<AtomicU64>,
}

/// One source partition of `events` readings; a step spending `work_ns`
/// on each; a windowed count of 4 partitions; and the even readings' numbers
/// to a sink of one partition.
fn job(events: u64, work_ns: u64) -> (Job, Outputs) {
    let outputs = Outputs {
        rows: Rows::default(),
        numbers: Arc::default(),
        elsewhere: Arc::default(),
    };
    let mut job = Job::new("relayed", Duration::from_millis(200));
    let source = job.source(
        "tagged",
        1,
        Arc::new(move |_, _| {
            Box::new(Tagged {
                next: 0,
                end: events,
            })
        }),
    );
    let elsewhere = outputs.elsewhere.clone();
    let rows = outputs.rows.clone();
    source
        .map(move |(n, tag): (u64, u64)| {
            if tag != thread_tag() {
                elsewhere.fetch_add(1, Ordering::Relaxed);
            }
            let started = Instant::now();
            while started.elapsed() < Duration::from_nanos(work_ns) {
                std::hint::spin_loop();
            }
            reading(n)
        })
        .key_by(|r: &(u64, i64)| r.0)
        .window_aggregate(
            "count",
            4,
            WindowSpec::Tumbling { size_ms: WINDOW_MS },
            |r| r.1,
            |r| r.0,
            Count::new(|key, (start, _), n| (key, start, n)),
        )
        .sink(
            "rows",
            2,
            Arc::new(move |_| Box::new(Collect(rows.clone()))),
        );
    let numbers = outputs.numbers.clone();
    source.filter(|(n, _)| n % 2 == 0).map(|(n, _)| n).sink(
        "numbers",
        1,
        Arc::new(move |_| Box::new(Numbers(numbers.clone()))),
    );
    (job, outputs)
}

fn assert_exact(outputs: &Outputs, events: u64, what: &str) {
    let mut rows = outputs.rows.lock().unwrap().clone();
    rows.sort();
    assert_eq!(rows, reference(events), "{what}: exact counts");
    let mut numbers = outputs.numbers.lock().unwrap().clone();
    numbers.sort();
    let even: Vec<u64> = (0..events).filter(|n| n % 2 == 0).collect();
    assert_eq!(numbers, even, "{what}: every even reading once");
}

/// The job's stages whose steps may go to relays: the source (stage 0).
const SOURCE: u32 = 0;

#[test]
fn steps_switched_at_random_between_fused_and_relays_while_actors_move_stay_exact() {
    const EVENTS: u64 = 400_000;
    for (shards, seed) in [(2usize, 1u64), (2, 2), (3, 3), (3, 4)] {
        let mut config = DataflowConfig::default();
        config.runtime.shards = shards;
        config.runtime.oversubscribe = true;
        let mut dataflow = Dataflow::start(config).unwrap();
        let (mut job, outputs) = job(EVENTS, 0);
        // No autoscaler here: the job asks for its relays itself.
        job.rate(Some(400_000)).relays(true);
        let handle = dataflow.submit(job).unwrap();
        let actors = dataflow.actors(handle.id);
        // The count's edge to its sink has no steps: nothing to split out.
        let error = dataflow.unchain(handle.id, 1, true).unwrap_err();
        assert!(error.contains("no relay"), "{error}");
        let mut rng = SimRng::new(seed);
        let (mut switches, mut moves) = (0u64, 0u64);
        let started = Instant::now();
        while !handle.is_done() {
            assert!(started.elapsed() < Duration::from_secs(60), "run hangs");
            let on = rng.below(2) == 0;
            if let Err(e) = dataflow.unchain(handle.id, SOURCE, on) {
                assert!(handle.is_done(), "{e}");
            }
            switches += 1;
            if rng.below(3) == 0 {
                let actor = actors[rng.below(actors.len() as u64) as usize];
                dataflow.migrate(actor, ShardId(rng.below(shards as u64) as u16));
                moves += 1;
            }
            std::thread::sleep(Duration::from_micros(200 + rng.below(2_000)));
        }
        handle.wait(Duration::from_secs(10)).unwrap();
        let elsewhere = outputs.elsewhere.load(Ordering::Relaxed);
        eprintln!(
            "shards {shards} seed {seed}: {switches} switches, {moves} moves, {elsewhere} \
             records mapped off the source's thread"
        );
        assert!(switches >= 50, "only {switches} switches");
        assert!(elsewhere > 0, "no record went through a relay");
        assert_exact(&outputs, EVENTS, &format!("shards {shards} seed {seed}"));
        dataflow.shutdown();
    }
}

#[test]
fn a_source_busy_with_its_steps_has_them_split_out_by_the_autoscaler_and_rows_stay_exact() {
    const EVENTS: u64 = 1_500_000;
    let mut config = DataflowConfig::default();
    config.runtime.shards = 2;
    config.runtime.oversubscribe = true;
    config.autoscale = Some(AutoscaleOptions {
        interval: Duration::from_millis(20),
        ..AutoscaleOptions::default()
    });
    let mut dataflow = Dataflow::start(config).unwrap();
    // A microsecond of work a record: the source's shard is saturated by
    // its steps alone.
    let (job, outputs) = job(EVENTS, 1_000);
    let handle = dataflow.submit(job).unwrap();
    handle.wait(Duration::from_secs(120)).unwrap();
    let decisions = dataflow.decisions();
    let unchained = decisions.iter().find(|d| {
        d.action
            == Action::Unchain {
                job: handle.id,
                stage: SOURCE,
            }
    });
    let elsewhere = outputs.elsewhere.load(Ordering::Relaxed);
    eprintln!(
        "{} decisions, the split: {unchained:?}; {elsewhere} records mapped off the source's \
         thread",
        decisions.len()
    );
    assert!(unchained.is_some(), "no split out: {decisions:#?}");
    assert!(elsewhere > 0, "no record went through a relay");
    assert_exact(&outputs, EVENTS, "autoscaled");
    dataflow.shutdown();
}

//! Windows fired a step at a time (`fire_step_keys`): a two-phase count whose
//! first phase fires each window over many turns of its actors, on 1 and 2
//! shards, with those actors migrating while it runs. The second phase is
//! keyed by window and counts a partial that comes after the watermark that
//! passed its window as late: a first phase that passed its watermark on
//! before the rows of the window it was firing would show here, as late rows
//! and a wrong count. Output is checked exactly against a plain count.

#[path = "common/readings.rs"]
mod readings;

use std::sync::Arc;
use std::time::Duration;

use dirigo_engine::dataflow::ops::{Count, PartialRow, WindowMerge, WindowPartial, WindowSpec};
use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job};
use dirigo_engine::ShardId;
use readings::{reference, Collect, Rows, WINDOW_MS};

const EVENTS: u64 = 400_000;
/// Keys a window fire of phase 1 visits per turn: some 250 keys a
/// partition and window fire in fifty steps.
const FIRE_STEP_KEYS: usize = 5;

fn job(rows: Rows) -> Job {
    let mut job = Job::new("stepped", Duration::from_millis(200));
    let count = || Count::new(|key, (start, _), n| (key, start, n));
    readings::source(&mut job, EVENTS)
        .key_by(|r: &(u64, i64)| r.0)
        .process(
            "partial",
            4,
            WindowPartial::new(
                WindowSpec::Tumbling { size_ms: WINDOW_MS },
                |r: &(u64, i64)| r.1,
                |r: &(u64, i64)| r.0,
                count(),
            )
            .fire_step_keys(FIRE_STEP_KEYS)
            .factory(),
        )
        .key_by(|p: &PartialRow<u64>| p.window.1 as u64)
        .process("merge", 3, WindowMerge::new(count()).factory())
        .sink("out", 2, Arc::new(move |_| Box::new(Collect(rows.clone()))));
    job
}

#[test]
fn a_window_fired_over_many_turns_reaches_the_next_phase_before_its_watermark() {
    let expected = reference(EVENTS);
    for (shards, migrate) in [(1, false), (2, false), (2, true)] {
        let mut config = DataflowConfig::default();
        config.runtime.shards = shards;
        config.runtime.oversubscribe = true;
        let mut dataflow = Dataflow::start(config).unwrap();
        let rows: Rows = Default::default();
        let handle = dataflow.submit(job(rows.clone())).unwrap();
        if migrate {
            // Move the first phase's actors back and forth while it fires.
            for round in 0..20u16 {
                std::thread::sleep(Duration::from_millis(5));
                for actor in dataflow.actors(handle.id) {
                    if actor.operator == 1 {
                        dataflow.migrate(actor, ShardId((round + actor.partition as u16) % 2));
                    }
                }
            }
        }
        let report = dataflow.wait(&handle, Duration::from_secs(120)).unwrap();
        dataflow.shutdown();
        assert_eq!(
            report.late_records, 0,
            "{shards} shards, migrating {migrate}: no partial came after its watermark"
        );
        let mut rows = rows.lock().unwrap().clone();
        rows.sort();
        assert_eq!(
            rows.len(),
            expected.len(),
            "{shards} shards, migrating {migrate}"
        );
        assert_eq!(rows, expected, "{shards} shards, migrating {migrate}");
    }
}

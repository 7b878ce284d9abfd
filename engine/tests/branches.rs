//! A stage with several consumers: the last route takes each batch, the others
//! are lent it and copy what their steps keep. Every branch, whichever step it
//! starts with, gets exactly the records of a plain computation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirigo_engine::dataflow::state::Stateful;
use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job, Operator, Sink, Source, SourceBatch};

const RECORDS: u64 = 20_000;

/// `0..RECORDS` as strings (records that own heap memory), 700 per batch.
struct Numbers {
    next: u64,
}

impl Source<String> for Numbers {
    fn next_batch(&mut self, _max: usize, out: &mut Vec<String>) -> SourceBatch {
        if self.next == RECORDS {
            return SourceBatch::Done;
        }
        let end = (self.next + 700).min(RECORDS);
        out.extend((self.next..end).map(|n| n.to_string()));
        self.next = end;
        SourceBatch::More { watermark_ms: 0 }
    }
}

/// A keyed stage that passes its records on.
struct Pass;

impl Operator<String, String> for Pass {
    fn on_records(&mut self, records: Vec<String>, out: &mut Vec<String>) {
        out.extend(records);
    }
    fn state(&mut self) -> Option<&mut dyn Stateful> {
        None
    }
}

#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<String>>>);

impl Sink<String> for Collected {
    fn write(&mut self, records: &[String]) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
}

impl Collected {
    fn sorted(&self) -> Vec<String> {
        let mut rows = self.0.lock().unwrap().clone();
        rows.sort();
        rows
    }
}

fn number(s: &str) -> u64 {
    s.parse().expect("a number")
}

fn sorted(rows: impl Iterator<Item = String>) -> Vec<String> {
    let mut rows: Vec<String> = rows.collect();
    rows.sort();
    rows
}

#[test]
fn every_branch_of_a_shared_stage_gets_exactly_its_records() {
    for shards in [1, 2] {
        let mut config = DataflowConfig::default();
        config.runtime.shards = shards;
        let mut dataflow = Dataflow::start(config).expect("engine starts");
        let outs: Vec<Collected> = (0..6).map(|_| Collected::default()).collect();
        let sink = |i: usize| {
            let out = outs[i].clone();
            Arc::new(move |_| Box::new(out.clone()) as Box<dyn Sink<String>>)
        };
        let mut job = Job::new("branches", Duration::from_millis(50));
        let numbers = job.source("numbers", 1, Arc::new(|_, _| Box::new(Numbers { next: 0 })));
        numbers
            .filter(|s| number(s).is_multiple_of(2))
            .sink("even", 1, sink(0));
        numbers.map(|s| format!("{s}!")).sink("marked", 2, sink(1));
        numbers
            .filter_map(|s| (number(&s).is_multiple_of(5)).then(|| (number(&s) / 5).to_string()))
            .sink("fifths", 1, sink(2));
        numbers
            .filter_map_ref(|s| (number(s).is_multiple_of(7)).then(|| format!("{s}/7")))
            .sink("sevens", 1, sink(3));
        numbers
            .flat_map(|s, out| {
                if number(&s).is_multiple_of(100) {
                    out.push(s.clone());
                    out.push(s);
                }
            })
            .sink("doubled", 1, sink(4));
        // The last consumer, keyed: it takes the batches the others were lent.
        numbers
            .filter(|s| number(s).is_multiple_of(3))
            .key_by(|s| number(s))
            .process("keyed", 2, Arc::new(|_| Box::new(Pass)))
            .sink("thirds", 2, sink(5));
        let handle = dataflow.submit(job).expect("submits");
        dataflow
            .wait(&handle, Duration::from_secs(60))
            .expect("ends");
        dataflow.shutdown();

        let all = || (0..RECORDS).map(|n| n.to_string());
        let expected = [
            sorted(all().filter(|s| number(s).is_multiple_of(2))),
            sorted(all().map(|s| format!("{s}!"))),
            sorted(
                (0..RECORDS)
                    .filter(|n| n.is_multiple_of(5))
                    .map(|n| (n / 5).to_string()),
            ),
            sorted(
                all()
                    .filter(|s| number(s).is_multiple_of(7))
                    .map(|s| format!("{s}/7")),
            ),
            sorted(
                all()
                    .filter(|s| number(s).is_multiple_of(100))
                    .flat_map(|s| [s.clone(), s]),
            ),
            sorted(all().filter(|s| number(s).is_multiple_of(3))),
        ];
        for (i, expected) in expected.iter().enumerate() {
            assert_eq!(&outs[i].sorted(), expected, "branch {i} on {shards} shards");
        }
    }
}

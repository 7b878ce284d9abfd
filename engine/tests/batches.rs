//! A stage's output leaves in messages of at most `BATCH_RECORDS_MAX` records,
//! however much one call emits (a window operator firing everything at the end
//! of input), in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirigo_engine::dataflow::graph::BATCH_RECORDS_MAX;
use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job, Operator, Sink, Source, SourceBatch};

struct One(bool);

impl Source<u64> for One {
    fn next_batch(&mut self, _max: usize, out: &mut Vec<u64>) -> SourceBatch {
        if self.0 {
            return SourceBatch::Done;
        }
        self.0 = true;
        out.push(0);
        SourceBatch::More { watermark_ms: 0 }
    }
}

/// Emits 10,000 numbers at the end of input, in one call.
struct Burst;

impl Operator<u64, u64> for Burst {
    fn on_records(&mut self, _records: Vec<u64>, _out: &mut Vec<u64>) {}
    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<u64>) {
        if watermark_ms == i64::MAX {
            out.extend(0..10_000);
        }
    }
    fn state(&mut self) -> Option<&mut dyn dirigo_engine::dataflow::state::Stateful> {
        None
    }
}

struct Sizes(Arc<Mutex<Vec<Vec<u64>>>>);

impl Sink<u64> for Sizes {
    fn write(&mut self, records: &[u64]) {
        self.0.lock().unwrap().push(records.to_vec());
    }
}

#[test]
fn a_large_output_leaves_in_bounded_messages_in_order() {
    let mut config = DataflowConfig::default();
    config.runtime.shards = 1;
    let mut dataflow = Dataflow::start(config).expect("engine starts");
    let batches = Arc::new(Mutex::new(Vec::new()));
    let seen = batches.clone();
    let mut job = Job::new("burst", Duration::from_millis(50));
    job.source("one", 1, Arc::new(|_, _| Box::new(One(false))))
        .key_by(|_| 0)
        .process("burst", 1, Arc::new(|_| Box::new(Burst)))
        .sink("sizes", 1, Arc::new(move |_| Box::new(Sizes(seen.clone()))));
    let handle = dataflow.submit(job).expect("submits");
    dataflow
        .wait(&handle, Duration::from_secs(30))
        .expect("ends");
    let batches = batches.lock().unwrap().clone();
    assert!(batches.len() >= 3, "{} batches", batches.len());
    assert!(batches.iter().all(|b| b.len() <= BATCH_RECORDS_MAX));
    let all: Vec<u64> = batches.into_iter().flatten().collect();
    assert_eq!(all, (0..10_000).collect::<Vec<_>>());
    dataflow.shutdown();
}

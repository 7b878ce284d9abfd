//! The upkeep hook (`dirigo_engine::runtime::set_upkeep_hook`), alone in its
//! test binary: the hook is the process's, and a runtime of another test
//! running beside it would call it too.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use dirigo_engine::runtime::{RuntimeConfig, ShardConfig};

static UPKEEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static UPKEEPS_OFF_SHARD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

static UPKEEP_THREADS: std::sync::Mutex<Vec<std::thread::ThreadId>> =
    std::sync::Mutex::new(Vec::new());

fn count_upkeep() {
    UPKEEPS.fetch_add(1, Ordering::Relaxed);
    let mut threads = UPKEEP_THREADS.lock().unwrap();
    let me = std::thread::current().id();
    if !threads.contains(&me) {
        threads.push(me);
    }
    if !dirigo_engine::runtime::shard_io_available() {
        UPKEEPS_OFF_SHARD.fetch_add(1, Ordering::Relaxed);
    }
}

/// The upkeep hook runs on the shards' own threads, between passes, at most
/// once per `UPKEEP_EVERY` on each (the clock is monotonic, so the bound holds
/// on any machine), and can be set only once.
#[test]
fn the_upkeep_hook_runs_on_every_shard_at_most_every_millisecond() {
    assert!(dirigo_engine::runtime::set_upkeep_hook(count_upkeep));
    assert!(!dirigo_engine::runtime::set_upkeep_hook(count_upkeep));
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 20_000,
        batch: 64,
        target_spin_ns: 0,
    };
    let started = Instant::now();
    let config = RuntimeConfig {
        shards: 2,
        ring_packets: 256,
        shard: ShardConfig {
            mailbox_credit_messages: 64,
            ..ShardConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let (runtime, built) = start(&workload, config);
    wait_for(&built.ledger, 640_000, Duration::from_secs(60));
    runtime.shutdown();
    let elapsed = started.elapsed();
    built.ledger.assert_complete(workload.per_channel);
    let calls = UPKEEPS.load(Ordering::Relaxed);
    let every = dirigo_engine::runtime::UPKEEP_EVERY;
    let most = 2 * (elapsed.as_nanos() / every.as_nanos() + 1) as u64;
    assert!(calls > 0, "the hook never ran");
    assert_eq!(
        UPKEEP_THREADS.lock().unwrap().len(),
        2,
        "not on each of the 2 shards"
    );
    assert!(calls <= most, "{calls} upkeeps in {elapsed:?} on 2 shards");
    assert_eq!(UPKEEPS_OFF_SHARD.load(Ordering::Relaxed), 0);
}

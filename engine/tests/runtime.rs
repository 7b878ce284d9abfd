//! Tests of the threaded runtime: real glommio executors, real rings, real time.
//! Each waits for its workload with a generous deadline and then checks the ledger
//! exactly; timing never decides a result.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dirigo_engine::runtime::{MemoryStateStore, RuntimeConfig, ShardConfig};
use dirigo_engine::{Runtime, ShardId};

fn config(shards: usize, credit: u32) -> RuntimeConfig {
    RuntimeConfig {
        shards,
        ring_packets: 256,
        shard: ShardConfig {
            mailbox_credit_messages: credit,
            ..ShardConfig::default()
        },
        ..RuntimeConfig::default()
    }
}

fn wait_for(ledger: &Ledger, total: u64, limit: Duration) {
    let start = Instant::now();
    while ledger.received.load(Ordering::Acquire) < total {
        assert!(
            start.elapsed() < limit,
            "only {} of {total} messages after {limit:?}",
            ledger.received.load(Ordering::Acquire)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn start(workload: &Workload, config: RuntimeConfig) -> (Runtime<Msg>, Built) {
    let built = build(workload);
    let runtime = Runtime::start(
        config,
        built.factory.clone(),
        Arc::new(MemoryStateStore::default()),
    )
    .expect("runtime starts");
    for s in 0..workload.sources {
        runtime
            .send(source(s), Msg::Tick, sched())
            .expect("shard alive");
    }
    (runtime, built)
}

#[test]
fn per_sender_fifo_across_shards_under_load() {
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 10_000,
        batch: 64,
        target_spin_ns: 0,
    };
    let (runtime, built) = start(&workload, config(2, 64));
    wait_for(&built.ledger, 320_000, Duration::from_secs(60));
    built.ledger.assert_complete(workload.per_channel);
    let stats = runtime.stats();
    assert!(
        stats.shards.iter().all(|s| s.messages > 0),
        "both shards did work"
    );
    runtime.shutdown();
}

#[test]
fn a_million_messages_with_random_migrations_each_handled_once_in_order() {
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 31_250,
        batch: 64,
        target_spin_ns: 0,
    };
    let total = 1_000_000;
    let (runtime, built) = start(&workload, config(2, 64));
    let mut rng = dirigo_engine::runtime::sim::SimRng::new(42);
    let start = Instant::now();
    let mut migrations = 0;
    while built.ledger.received.load(Ordering::Acquire) < total {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "stuck at {}",
            built.ledger.received.load(Ordering::Acquire)
        );
        let pick = rng.below((workload.sources + workload.targets) as u64) as u32;
        let actor = if pick < workload.sources {
            source(pick)
        } else {
            target(pick - workload.sources)
        };
        runtime
            .migrate(actor, ShardId(rng.below(2) as u16))
            .expect("shards alive");
        migrations += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    built.ledger.assert_complete(workload.per_channel);
    let stats = runtime.stats();
    let moved: u64 = stats.shards.iter().map(|s| s.migrations_in).sum();
    assert!(
        moved >= 20,
        "only {moved} of {migrations} migrations moved an actor"
    );
    runtime.shutdown();
}

#[test]
fn a_slow_actor_makes_senders_wait_and_memory_stays_bounded() {
    let credit = 32u32;
    let workload = Workload {
        sources: 4,
        targets: 1,
        per_channel: 3_000,
        batch: 16,
        target_spin_ns: 20_000,
    };
    let (runtime, built) = start(&workload, config(2, credit));
    let start = Instant::now();
    let mut max_mailbox = 0;
    let mut max_backlog = 0;
    while built.ledger.received.load(Ordering::Acquire) < 12_000 {
        assert!(start.elapsed() < Duration::from_secs(60));
        let backlog = built.sent_total.load(Ordering::Acquire)
            - built.ledger.received.load(Ordering::Acquire);
        max_backlog = max_backlog.max(backlog);
        for shard in runtime.stats().shards {
            for actor in shard.actors {
                max_mailbox = max_mailbox.max(actor.mailbox + actor.early);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    built.ledger.assert_complete(workload.per_channel);
    // One local bound plus one remote credit window per shard.
    assert!(
        max_mailbox <= 2 * credit as usize,
        "mailbox grew to {max_mailbox}"
    );
    // Senders waited: what they sent but the target had not handled stayed bounded.
    let bound = 2 * credit as u64 + (workload.sources * workload.batch) as u64;
    assert!(max_backlog <= bound, "backlog {max_backlog} > {bound}");
    runtime.shutdown();
}

#[test]
fn idle_actors_are_deactivated_and_come_back_with_their_state() {
    let workload = Workload {
        sources: 2,
        targets: 2,
        per_channel: 100,
        batch: 16,
        target_spin_ns: 0,
    };
    let mut config = config(2, 64);
    config.shard.idle_timeout_ns = Some(20_000_000);
    config.housekeeping_interval = Duration::from_millis(5);
    let (runtime, built) = start(&workload, config);
    wait_for(&built.ledger, 400, Duration::from_secs(30));
    let start = Instant::now();
    loop {
        let stats = runtime.stats();
        let deactivated: u64 = stats.shards.iter().map(|s| s.deactivations).sum();
        if deactivated >= 4 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "actors never deactivated"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The sources were deactivated having sent everything: a new tick reactivates
    // them, and their restored state says they are done, so nothing more is sent.
    for s in 0..workload.sources {
        runtime
            .send(source(s), Msg::Tick, sched())
            .expect("shard alive");
    }
    std::thread::sleep(Duration::from_millis(50));
    built.ledger.assert_complete(workload.per_channel);
    runtime.shutdown();
}

#[test]
fn statistics_are_served_while_outside_sends_wait_for_credit() {
    // 2,000 messages at 1 ms each: two seconds of work behind a credit of 8.
    let workload = Workload {
        sources: 1,
        targets: 1,
        per_channel: 1,
        batch: 1,
        target_spin_ns: 1_000_000,
    };
    let built = build(&workload);
    let runtime = Arc::new(
        Runtime::start(
            config(2, 8),
            built.factory.clone(),
            Arc::new(MemoryStateStore::default()),
        )
        .expect("runtime starts"),
    );
    // A thread floods the slow target from outside: its sends wait for credit.
    let sender = {
        let runtime = runtime.clone();
        std::thread::spawn(move || {
            for n in 1..=2_000u64 {
                runtime
                    .send(target(0), Msg::Data { source: 0, n }, sched())
                    .expect("shard alive");
            }
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let stats = runtime.stats();
    assert_eq!(stats.shards.len(), 2);
    // Served while most sends still wait: not queued behind them.
    let handled = built.ledger.received.load(Ordering::Acquire);
    assert!(
        handled < 1_000,
        "stats came only after {handled} of 2000 messages"
    );
    sender.join().expect("sender thread");
    wait_for(&built.ledger, 2_000, Duration::from_secs(60));
    built.ledger.assert_complete(2_000);
    Arc::try_unwrap(runtime)
        .ok()
        .expect("last reference")
        .shutdown();
}

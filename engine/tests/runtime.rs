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

/// A shard measures the time its loop has nothing to do: idle, nearly all
/// of it; under load, its busy time (what is not idle) holds its actors'
/// turns and more (the runtime's own work), which the autoscaler charges
/// to the actors.
#[test]
fn a_shard_measures_its_idle_time_and_its_busy_time_holds_its_actors_turns() {
    let idle = |runtime: &Runtime<Msg>| -> Vec<(u64, u64)> {
        runtime
            .stats()
            .shards
            .iter()
            .map(|s| (s.at_ns, s.idle_ns.expect("a shard's loop measures it")))
            .collect()
    };
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 6_000,
        batch: 64,
        target_spin_ns: 2_000,
    };
    let (runtime, built) = start(&workload, config(2, 64));
    let turns_ns = |runtime: &Runtime<Msg>| -> Vec<u64> {
        runtime
            .stats()
            .shards
            .iter()
            .map(|s| s.actors.iter().map(|a| a.counters.cpu_ns).sum())
            .collect()
    };
    // Under load: from a first report to one near the end.
    while built.ledger.received.load(Ordering::Acquire) < 20_000 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (before, turns_before) = (idle(&runtime), turns_ns(&runtime));
    while built.ledger.received.load(Ordering::Acquire) < 150_000 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (after, turns_after) = (idle(&runtime), turns_ns(&runtime));
    let mut busiest = 0.0f64;
    for shard in 0..2 {
        let wall = after[shard].0 - before[shard].0;
        let busy = wall - (after[shard].1 - before[shard].1);
        let turns = turns_after[shard].saturating_sub(turns_before[shard]);
        assert!(
            turns <= busy + 1_000_000,
            "shard {shard}: turns of {turns} ns within a busy time of {busy} of {wall}"
        );
        busiest = busiest.max(busy as f64 / wall as f64);
    }
    assert!(busiest > 0.3, "a shard was busy under load ({busiest:.2})");
    wait_for(&built.ledger, 192_000, Duration::from_secs(60));
    built.ledger.assert_complete(workload.per_channel);
    // Idle: nearly all of the time.
    std::thread::sleep(Duration::from_millis(50));
    let before = idle(&runtime);
    std::thread::sleep(Duration::from_millis(300));
    let after = idle(&runtime);
    for shard in 0..2 {
        let wall = after[shard].0 - before[shard].0;
        let idle = after[shard].1 - before[shard].1;
        assert!(
            idle as f64 >= 0.8 * wall as f64,
            "shard {shard} idle {idle} ns of {wall}"
        );
    }
    runtime.shutdown();
}

/// Durations and times at their largest overflow nothing: housekeeping, the
/// spin before parking, the idle timeout and the turn bound set to the maximum
/// still deliver every message exactly, and the runtime stops promptly.
#[test]
fn the_largest_durations_overflow_nothing() {
    let workload = Workload {
        sources: 2,
        targets: 2,
        per_channel: 1_000,
        batch: 16,
        target_spin_ns: 0,
    };
    let mut config = config(2, 64);
    config.housekeeping_interval = Duration::MAX;
    config.spin_before_park = Duration::MAX;
    config.shard.idle_timeout_ns = Some(u64::MAX);
    config.shard.turn_ns_max = u64::MAX;
    config.shard.stall_ns = u64::MAX;
    let (runtime, built) = start(&workload, config);
    wait_for(&built.ledger, 4_000, Duration::from_secs(60));
    built.ledger.assert_complete(workload.per_channel);
    let stopping = Instant::now();
    runtime.shutdown();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stopping.elapsed()
    );
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

// ---- supervision ---------------------------------------------------------------

mod supervision {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use dirigo_engine::runtime::{
        Failure, MemoryStateStore, RuntimeConfig, SendError, ShardConfig, StateStore,
    };
    use dirigo_engine::{Actor, ActorId, BoxActor, Context, JobId, Runtime, SchedCtx, ShardId};

    /// Partition p lives on shard p % 2.
    const BOMB: u32 = 1;
    const COUNTER: u32 = 2;
    const RELAY: u32 = 3;

    #[derive(Debug)]
    enum T {
        /// Relay: send `n` hits to the bomb, then counts 1..=n to the counter.
        Relay(u64),
        /// Relay: send `n` counts round-robin to 500 counters on shard 1.
        Flood(u64),
        Hit,
        Count(u64),
    }

    fn sched(job: JobId) -> SchedCtx {
        SchedCtx {
            job,
            deadline_ns: u64::MAX,
            origin_ns: 0,
        }
    }

    fn bomb(job: JobId) -> ActorId {
        ActorId::new(job, BOMB, 0)
    }
    fn counter(job: JobId, partition: u32) -> ActorId {
        ActorId::new(job, COUNTER, partition)
    }
    fn relay(job: JobId) -> ActorId {
        ActorId::new(job, RELAY, 1)
    }

    /// What the actors saw, outside them.
    #[derive(Default)]
    struct Seen {
        /// Counts received, per (job, partition) of counter.
        counts: Mutex<Vec<(ActorId, u64)>>,
        activations: AtomicU64,
        failures: Mutex<Vec<Failure>>,
    }

    impl Seen {
        fn counts_of(&self, actor: ActorId) -> Vec<u64> {
            let counts = self.counts.lock().unwrap();
            counts
                .iter()
                .filter(|(a, _)| *a == actor)
                .map(|(_, n)| *n)
                .collect()
        }
    }

    struct Bomb;
    impl Actor for Bomb {
        type Message = T;
        fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
            None
        }
        fn handle(&mut self, _: T, _ctx: &mut Context<'_, T>) {
            panic!("boom");
        }
    }

    struct Counter {
        me: ActorId,
        seen: Arc<Seen>,
    }
    impl Actor for Counter {
        type Message = T;
        fn handle(&mut self, message: T, _ctx: &mut Context<'_, T>) {
            if let T::Count(n) = message {
                self.seen.counts.lock().unwrap().push((self.me, n));
            }
        }
        fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
            Some(dirigo_engine::encode_state(&0u64))
        }
    }

    struct Relay;
    impl Actor for Relay {
        type Message = T;
        fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
            None
        }
        fn handle(&mut self, message: T, ctx: &mut Context<'_, T>) {
            let job = ctx.me().job;
            if let T::Flood(n) = message {
                for i in 0..n {
                    ctx.send(counter(job, 2 * (i % 500) as u32 + 1), T::Count(i));
                }
                return;
            }
            let T::Relay(n) = message else { return };
            for _ in 0..n {
                ctx.send(bomb(job), T::Hit);
            }
            for i in 1..=n {
                ctx.send(counter(job, 2), T::Count(i));
            }
        }
    }

    fn start(config: RuntimeConfig) -> (Runtime<T>, Arc<Seen>, Arc<MemoryStateStore>) {
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let factory = move |id: ActorId, _: Option<&[u8]>| -> BoxActor<T> {
            s.activations.fetch_add(1, Ordering::Relaxed);
            match id.operator {
                BOMB => Box::new(Bomb),
                COUNTER => Box::new(Counter {
                    me: id,
                    seen: s.clone(),
                }),
                _ => Box::new(Relay),
            }
        };
        let s = seen.clone();
        let config = RuntimeConfig {
            on_failure: Some(Arc::new(move |f| s.failures.lock().unwrap().push(f))),
            ..config
        };
        let store = Arc::new(MemoryStateStore::default());
        let runtime = Runtime::start(config, Arc::new(factory), store.clone()).expect("starts");
        (runtime, seen, store)
    }

    fn config(credit: u32) -> RuntimeConfig {
        RuntimeConfig {
            shards: 2,
            ring_packets: 64,
            shard: ShardConfig {
                mailbox_credit_messages: credit,
                ..ShardConfig::default()
            },
            ..RuntimeConfig::default()
        }
    }

    fn wait_until(what: &str, limit: Duration, done: impl Fn() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_panicking_actor_is_reported_removed_and_releases_its_senders() {
        let job = JobId(1);
        let (runtime, seen, _) = start(config(8));
        // A remote sender (the relay, shard 1) and the outside (shard 0's injector)
        // both send far more than the credit to the bomb (shard 0).
        runtime
            .send(relay(job), T::Relay(1_000), sched(job))
            .unwrap();
        let started = Instant::now();
        for _ in 0..1_000 {
            runtime.send(bomb(job), T::Hit, sched(job)).unwrap();
        }
        // Meanwhile a counter on the bomb's shard gets its messages exactly.
        for n in 1..=1_000 {
            runtime
                .send(counter(job, 0), T::Count(n), sched(job))
                .unwrap();
        }
        wait_until("failure reported", Duration::from_secs(1), || {
            !seen.failures.lock().unwrap().is_empty()
        });
        let failure = seen.failures.lock().unwrap()[0].clone();
        assert_eq!(failure.actor, Some(bomb(job)));
        assert_eq!(failure.shard, ShardId(0));
        assert_eq!(failure.message, "boom");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The relay was released: its sends after the bomb's all arrived, in order.
        wait_until("relay released", Duration::from_secs(10), || {
            seen.counts_of(counter(job, 2)).len() == 1_000
        });
        assert_eq!(
            seen.counts_of(counter(job, 2)),
            (1..=1_000).collect::<Vec<_>>()
        );
        wait_until("counter served", Duration::from_secs(10), || {
            seen.counts_of(counter(job, 0)).len() == 1_000
        });
        assert_eq!(
            seen.counts_of(counter(job, 0)),
            (1..=1_000).collect::<Vec<_>>()
        );
        // Later messages are dropped, not handed to a new bomb.
        let activations = seen.activations.load(Ordering::Relaxed);
        for _ in 0..10 {
            runtime.send(bomb(job), T::Hit, sched(job)).unwrap();
        }
        let stats = runtime.stats();
        assert_eq!(seen.activations.load(Ordering::Relaxed), activations);
        assert_eq!(seen.failures.lock().unwrap().len(), 1);
        let shard0 = &stats.shards[0];
        assert_eq!(shard0.failures, 1);
        assert!(shard0.dropped >= 1_000, "dropped {}", shard0.dropped);
        assert!(stats.dead.is_empty());
        runtime.shutdown();
    }

    #[test]
    fn more_shards_than_cores_need_oversubscribe() {
        let cores = dirigo_engine::runtime::online_cores();
        let config = RuntimeConfig {
            shards: cores + 1,
            ..RuntimeConfig::default()
        };
        let factory = |_: ActorId, _: Option<&[u8]>| -> BoxActor<T> { Box::new(Bomb) };
        let error = Runtime::start(
            config,
            Arc::new(factory),
            Arc::new(MemoryStateStore::default()),
        )
        .err()
        .expect("refused");
        assert!(error.0.contains("--oversubscribe"), "{error}");
        assert!(
            error.0.contains(&format!("{cores} cores online")),
            "{error}"
        );
    }

    #[test]
    fn retire_job_reclaims_actors_and_drops_late_messages() {
        let (old, new) = (JobId(7), JobId(8));
        let mut config = config(8);
        config.shard.idle_timeout_ns = Some(20_000_000);
        config.housekeeping_interval = Duration::from_millis(5);
        let (runtime, seen, store) = start(config);
        for job in [old, new] {
            for partition in 0..4 {
                runtime
                    .send(counter(job, partition), T::Count(1), sched(job))
                    .unwrap();
            }
        }
        // The old job's counters go idle and are saved; then it gets fresh ones.
        wait_until("deactivated", Duration::from_secs(10), || store.len() == 8);
        for partition in 4..8 {
            runtime
                .send(counter(old, partition), T::Count(1), sched(old))
                .unwrap();
        }
        wait_until("all counted", Duration::from_secs(10), || {
            seen.counts.lock().unwrap().len() == 12
        });
        assert!(
            runtime.retire_job(old),
            "every shard confirms the retirement"
        );
        let actors_of = |job: JobId| -> usize {
            runtime
                .stats()
                .shards
                .iter()
                .flat_map(|s| s.actors.iter())
                .filter(|a| a.id.job == job)
                .count()
        };
        assert_eq!(actors_of(old), 0);
        wait_until("old state dropped", Duration::from_secs(1), || {
            store.len() == 4
        });
        let activations = seen.activations.load(Ordering::Relaxed);
        for partition in 0..8 {
            runtime
                .send(counter(old, partition), T::Count(2), sched(old))
                .unwrap();
        }
        runtime
            .send(counter(new, 0), T::Count(2), sched(new))
            .unwrap();
        wait_until("new job still served", Duration::from_secs(10), || {
            seen.counts.lock().unwrap().len() == 13
        });
        assert_eq!(actors_of(old), 0);
        assert_eq!(seen.activations.load(Ordering::Relaxed), activations + 1);
        let stats = runtime.stats();
        assert_eq!(stats.shards.iter().map(|s| s.dropped).sum::<u64>(), 8);
        assert_eq!(stats.shards.iter().map(|s| s.jobs_retired).sum::<u64>(), 2);
        runtime.shutdown();
    }

    #[test]
    fn a_crashed_shard_hangs_neither_stats_nor_sends_nor_its_peers() {
        let job = JobId(1);
        let (runtime, seen, _) = start(config(1_000_000));
        runtime.crash_shard_for_test(ShardId(1)).unwrap();
        wait_until("shard 1 dead", Duration::from_secs(1), || {
            runtime.is_dead(ShardId(1))
        });
        wait_until("death reported", Duration::from_secs(1), || {
            !seen.failures.lock().unwrap().is_empty()
        });
        let failure = seen.failures.lock().unwrap()[0].clone();
        assert_eq!((failure.actor, failure.shard), (None, ShardId(1)));
        assert!(
            failure.message.contains("crashed on request"),
            "{failure:?}"
        );
        let asked = Instant::now();
        let stats = runtime.stats();
        assert!(asked.elapsed() < Duration::from_secs(1));
        assert_eq!(stats.dead, vec![ShardId(1)]);
        assert_eq!(stats.shards.len(), 1);
        assert_eq!(
            runtime.send(counter(job, 1), T::Count(1), sched(job)),
            Err(SendError::ShardDead(ShardId(1)))
        );
        assert_eq!(
            runtime.migrate(counter(job, 0), ShardId(1)),
            Err(SendError::ShardDead(ShardId(1)))
        );
        // Shard 0 floods the dead shard (more than its ring holds) and keeps
        // serving its own actors.
        runtime
            .send(ActorId::new(job, RELAY, 0), T::Flood(10_000), sched(job))
            .unwrap();
        for n in 1..=100 {
            runtime
                .send(counter(job, 0), T::Count(n), sched(job))
                .unwrap();
        }
        wait_until("shard 0 serves", Duration::from_secs(10), || {
            seen.counts_of(counter(job, 0)).len() == 100
        });
        wait_until("the flood dropped", Duration::from_secs(10), || {
            runtime.stats().shards[0].dropped_to_dead_shards > 0
        });
        runtime.shutdown();
    }
}

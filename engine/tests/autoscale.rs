//! The autoscaler in a running engine: every actor of a job packed onto one
//! shard at full speed, the autoscaler spreads them, the output stays exactly
//! the reference's; a job with scaling off beside it is never moved.
//! Serverless sizing: a job starts on one shard (two jobs submitted together
//! on two), a light job is never spread, and a light job spread over both
//! shards is drained into one once its shards have been cold for a second.
//! Scale to zero: a paused job's stages are deactivated by the autoscaler
//! (the shards' own idle timeout off) and wake with their state. A hot
//! partition no move relieves is split live into a partition on the other
//! shard. Over two nodes, each node's autoscaler spreads the actors packed
//! on its first shard among its own shards, moving one off its node only
//! as a spill (nothing of its own relieves the shard), and only node 0's
//! splits a hot partition, into another of its own; a node of one shard
//! spills keyed actors to the other; the output stays exact.

#[path = "common/readings.rs"]
mod readings;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dirigo_engine::autoscale::{Action, Scale};
use dirigo_engine::dataflow::checkpoint::CheckpointOptions;
use dirigo_engine::dataflow::ops::{Count, WindowSpec};
use dirigo_engine::dataflow::pace::{RateSchedule, RateStep};
use dirigo_engine::dataflow::{
    AutoscaleOptions, Dataflow, DataflowConfig, Job, JobHandle, JobReport,
};
use dirigo_engine::{JobId, ShardId};
use readings::{reference, Collect, Rows, WINDOW_MS};

const EVENTS: u64 = 3_000_000;
/// A windowed count of `events` readings, at `per_s` if given (light: a
/// few percent of a core), else as fast as it goes.
fn job(name: &str, events: u64, per_s: Option<u64>, rows: Rows) -> Job {
    let mut job = Job::new(name, Duration::from_millis(200));
    job.pace(per_s.map(RateSchedule::constant));
    readings::source(&mut job, events)
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

fn engine() -> Dataflow {
    let mut config = DataflowConfig::default();
    config.runtime.shards = 2;
    config.runtime.oversubscribe = true;
    config.autoscale = Some(AutoscaleOptions {
        interval: Duration::from_millis(20),
        ..AutoscaleOptions::default()
    });
    Dataflow::start(config).unwrap()
}

/// The shards `job`'s active actors are on now.
fn shards_of(dataflow: &Dataflow, job: JobId) -> BTreeSet<ShardId> {
    dataflow
        .stats()
        .shards
        .iter()
        .filter(|r| r.actors.iter().any(|a| a.id.job == job))
        .map(|r| r.shard)
        .collect()
}

fn assert_exact(rows: &Rows, events: u64) {
    let mut rows = rows.lock().unwrap().clone();
    rows.sort();
    assert_eq!(rows, reference(events), "exact output");
}

#[test]
fn the_autoscaler_spreads_a_job_packed_on_one_shard_and_its_output_stays_exact() {
    let expected = reference(EVENTS);
    let mut dataflow = engine();
    let (moving, fixed): (Rows, Rows) = Default::default();
    let mut pinned = job("pinned", EVENTS, None, fixed.clone());
    pinned.autoscale(false);
    let pinned = dataflow.submit(pinned).unwrap();
    let handle = dataflow
        .submit(job("scaled", EVENTS, None, moving.clone()))
        .unwrap();
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
    let scaled = decisions
        .iter()
        .filter(|d| d.job() == Some(handle.id) && d.action.scale().is_some())
        .filter(|d| !d.reason.contains("not carried out"))
        .count() as u64;
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

#[test]
fn two_light_jobs_start_on_a_shard_each_and_are_never_spread() {
    const EVENTS: u64 = 300_000;
    let mut dataflow = engine();
    let (a_rows, b_rows): (Rows, Rows) = Default::default();
    let a = dataflow
        .submit(job("a", EVENTS, Some(500_000), a_rows.clone()))
        .unwrap();
    let b = dataflow
        .submit(job("b", EVENTS, Some(500_000), b_rows.clone()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(250));
    let (on_a, on_b) = (shards_of(&dataflow, a.id), shards_of(&dataflow, b.id));
    dataflow.wait(&a, Duration::from_secs(60)).unwrap();
    dataflow.wait(&b, Duration::from_secs(60)).unwrap();
    let decisions = dataflow.decisions();
    dataflow.shutdown();

    assert_eq!(on_a.len(), 1, "job a on one shard: {on_a:?}");
    assert_eq!(on_b.len(), 1, "job b on one shard: {on_b:?}");
    assert_ne!(on_a, on_b, "submitted together, they start apart");
    // Light jobs are never spread; once both shards have been cold for 20
    // steps, one is drained into the other.
    assert!(
        decisions
            .iter()
            .all(|d| d.action.scale() == Some(Scale::In)),
        "{decisions:#?}"
    );
    assert_exact(&a_rows, EVENTS);
    assert_exact(&b_rows, EVENTS);
}

#[test]
fn a_light_job_spread_over_two_shards_is_drained_into_one() {
    const EVENTS: u64 = 1_000_000;
    let mut dataflow = engine();
    let rows: Rows = Default::default();
    let handle = dataflow
        .submit(job("spread", EVENTS, Some(500_000), rows.clone()))
        .unwrap();
    // Spread by hand: odd partitions on shard 1, even ones on shard 0.
    for actor in dataflow.actors(handle.id) {
        dataflow.migrate(actor, ShardId((actor.partition % 2) as u16));
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = shards_of(&dataflow, handle.id);
    // Cold for 20 steps of 20 ms, then drained; 2 s of input in all.
    std::thread::sleep(Duration::from_millis(1_200));
    let after = shards_of(&dataflow, handle.id);
    let report = dataflow.wait(&handle, Duration::from_secs(60)).unwrap();
    let decisions = dataflow.decisions();
    dataflow.shutdown();

    assert_eq!(before.len(), 2, "spread at first: {before:?}");
    assert_eq!(after.len(), 1, "drained into one shard: {decisions:#?}");
    let ins: Vec<_> = decisions
        .iter()
        .filter(|d| d.action.scale() == Some(Scale::In))
        .collect();
    assert!(!ins.is_empty(), "{decisions:#?}");
    assert!(
        decisions
            .iter()
            .all(|d| d.action.scale() != Some(Scale::Out)),
        "nothing moves back out: {decisions:#?}"
    );
    assert!(report.scale_actions >= 1);
    assert_exact(&rows, EVENTS);
}

#[test]
fn a_paused_job_is_scaled_to_zero_by_the_autoscaler_and_wakes_with_its_state() {
    const EVENTS: u64 = 300_000;
    let mut config = DataflowConfig::default();
    config.runtime.shards = 2;
    config.runtime.oversubscribe = true;
    // Only the autoscaler deactivates: the shards' idle timeout is off.
    config.runtime.shard.idle_timeout_ns = None;
    config.autoscale = Some(AutoscaleOptions {
        interval: Duration::from_millis(20),
        ..AutoscaleOptions::default()
    });
    let mut dataflow = Dataflow::start(config).unwrap();
    let rows: Rows = Default::default();
    // 0.3 s of input, a 1.5 s pause, the rest: the pause falls inside a
    // window (event time is the record's number), so the count stage holds
    // open windows while it is at zero.
    let mut paused = job("paused", EVENTS, None, rows.clone());
    let step = |per_s, duration_ms| RateStep { per_s, duration_ms };
    paused.pace(Some(
        RateSchedule::new(&[step(500_000, 300), step(0, 1_500), step(500_000, 0)]).unwrap(),
    ));
    let handle = dataflow.submit(paused).unwrap();
    // 10 idle steps of 20 ms after the last record, then the deactivations
    // (with room for a loaded machine).
    std::thread::sleep(Duration::from_millis(1_100));
    let during = dataflow.stats();
    let report = dataflow.wait(&handle, Duration::from_secs(60)).unwrap();
    let decisions = dataflow.decisions();
    dataflow.shutdown();

    const COUNT_STAGE: u32 = 1;
    let active_counts: Vec<_> = during
        .shards
        .iter()
        .flat_map(|r| &r.actors)
        .filter(|a| a.id.job == handle.id && a.id.operator == COUNT_STAGE)
        .map(|a| a.id)
        .collect();
    assert!(
        active_counts.is_empty(),
        "every count actor is at zero in the pause: {active_counts:?}; {decisions:#?}"
    );
    let deactivated: u64 = during.shards.iter().map(|r| r.deactivations).sum();
    assert!(deactivated >= 4, "{deactivated} deactivations");
    let zero = decisions
        .iter()
        .position(|d| d.action == Action::ScaleToZero { job: handle.id })
        .unwrap_or_else(|| panic!("scaled to zero: {decisions:#?}"));
    let wake = decisions
        .iter()
        .position(|d| d.action == Action::Wake { job: handle.id })
        .unwrap_or_else(|| panic!("woken: {decisions:#?}"));
    assert!(zero < wake, "{decisions:#?}");
    assert!(report.scale_actions >= 1);
    // The open windows went to the store and came back: exact output.
    assert_exact(&rows, EVENTS);
}

/// Counts records like `Count`, spending `spin_ns` of CPU on each: a keyed
/// stage whose cost the test sets.
struct SlowCount {
    spin_ns: u64,
}

impl dirigo_engine::dataflow::ops::Aggregate<(u64, i64)> for SlowCount {
    type Acc = u64;
    type Out = (u64, i64, u64);
    const MERGEABLE: bool = true;

    fn new_acc(&self) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, _record: &(u64, i64)) {
        let start = std::time::Instant::now();
        while (start.elapsed().as_nanos() as u64) < self.spin_ns {
            std::hint::spin_loop();
        }
        *acc += 1;
    }
    fn merge(&self, acc: &mut u64, other: u64) {
        *acc += other;
    }
    fn emit(&self, key: u64, window: (i64, i64), acc: u64, out: &mut Vec<Self::Out>) {
        out.push((key, window.0, acc));
    }
}

/// A job whose keyed stage has every key in its partition 0's range of key
/// groups (so partition 0 does all its work), counting slowly; in two
/// phases, the first keeps partials. Its rows, and the rows it must give.
fn hot_job(two_phase: bool, events: u64) -> (Job, Rows, Vec<(u64, i64, u64)>) {
    hot_job_in(two_phase, events, 0)
}

/// `hot_job` with every key in partition `hot`'s range.
fn hot_job_in(two_phase: bool, events: u64, hot: u32) -> (Job, Rows, Vec<(u64, i64, u64)>) {
    const PARTITIONS: u32 = 4;
    let groups = dirigo_engine::dataflow::KEY_GROUPS_DEFAULT;
    // Reading key k becomes the k-th key whose group partition 0 owns.
    let hot_keys: Arc<Vec<u64>> = Arc::new(
        (0u64..)
            .filter(|&k| {
                let group = dirigo_engine::dataflow::key_group(k, groups);
                dirigo_engine::dataflow::partition_of_group(group, PARTITIONS, groups) == hot
            })
            .take(readings::KEYS as usize)
            .collect(),
    );
    let rows: Rows = Default::default();
    let mut job = Job::new("hot", Duration::from_millis(500));
    let keys = hot_keys.clone();
    let collected = rows.clone();
    let keyed = readings::source(&mut job, events)
        .map(move |r: (u64, i64)| (keys[r.0 as usize], r.1))
        .key_by(|r| r.0);
    let (spec, slow) = (
        WindowSpec::Tumbling { size_ms: WINDOW_MS },
        SlowCount { spin_ns: 1_000 },
    );
    let counted = if two_phase {
        keyed.window_aggregate_two_phase("slow-count", PARTITIONS, spec, |r| r.1, |r| r.0, slow)
    } else {
        keyed.window_aggregate("slow-count", PARTITIONS, spec, |r| r.1, |r| r.0, slow)
    };
    counted.sink(
        "out",
        2,
        Arc::new(move |_| Box::new(Collect(collected.clone()))),
    );
    let mut expected: Vec<_> = reference(events)
        .into_iter()
        .map(|(k, start, n)| (hot_keys[k as usize], start, n))
        .collect();
    expected.sort();
    (job, rows, expected)
}

/// The hot partition of `hot_job` fills shard 0 alone, and no move can
/// relieve it: the autoscaler splits that partition's key groups into a
/// partition on the other shard, live, and the output stays exact; also
/// when the job takes checkpoints (every 100 ms: splits and checkpoints take
/// turns; a checkpoint on the saturated shard can take longer than 20 ms
/// when other tests share the machine, and one every 20 ms then left the
/// split no turn).
#[test]
fn a_hot_partition_no_move_relieves_is_split_live_and_the_output_stays_exact() {
    const EVENTS: u64 = 1_000_000;
    for checkpointed in [false, true] {
        let mut dataflow = engine();
        let (mut job, rows, expected) = hot_job(false, EVENTS);
        let dir = std::env::temp_dir().join(format!("dirigo-hot-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if checkpointed {
            job.checkpoints(CheckpointOptions::new(&dir, Duration::from_millis(100)));
        }
        let handle = dataflow.submit(job).unwrap();
        let report = dataflow.wait(&handle, Duration::from_secs(120)).unwrap();
        let stats = handle.checkpoint_stats();
        let decisions = dataflow.decisions();
        dataflow.shutdown();
        let _ = std::fs::remove_dir_all(&dir);

        let what = if checkpointed { "with checkpoints" } else { "" };
        assert!(
            decisions
                .iter()
                .any(|d| matches!(d.action, Action::Split { actor, .. }
                if actor.job == handle.id && actor.operator == 1 && actor.partition == 0)
                    && !d.reason.contains("not carried out")),
            "partition 0 of the slow count is split {what}: {decisions:#?}"
        );
        if let Some(stats) = stats {
            eprintln!(
                "{} checkpoints, {} failed, last error {:?}",
                stats.completed, stats.failed, stats.last_error
            );
            assert!(stats.completed >= 3, "checkpoints were taken");
            assert_eq!(stats.failed, 0, "{:?}", stats.last_error);
        }
        assert!(report.scale_actions >= 1);
        let mut rows = rows.lock().unwrap().clone();
        rows.sort();
        assert_eq!(rows, expected, "exact output across the split {what}");
        assert_eq!(report.late_records, 0);
    }
}

/// The same in two phases: the first keeps partials, so the autoscaler
/// switches it to parallel mode (every batch to the partition with the least
/// backlog) instead, live, and the merged output stays exact.
#[test]
fn a_hot_stage_that_keeps_partials_goes_parallel_live_and_the_output_stays_exact() {
    const EVENTS: u64 = 1_000_000;
    let mut dataflow = engine();
    let (job, rows, expected) = hot_job(true, EVENTS);
    let handle = dataflow.submit(job).unwrap();
    let report = dataflow.wait(&handle, Duration::from_secs(120)).unwrap();
    let decisions = dataflow.decisions();
    dataflow.shutdown();

    assert!(
        decisions.iter().any(|d| d.action
            == Action::Parallel {
                job: handle.id,
                stage: 1
            }
            && !d.reason.contains("not carried out")),
        "the first phase goes parallel: {decisions:#?}"
    );
    let mut rows = rows.lock().unwrap().clone();
    rows.sort();
    assert_eq!(rows, expected, "exact output in parallel mode");
    assert_eq!(report.late_records, 0);
}

/// Nodes 0 and 1 of a dataflow over two nodes of two shards each, in this
/// process over loopback (node 1 started first), each with its autoscaler.
fn two_nodes() -> [Dataflow; 2] {
    nodes_of(2)
}

/// Two nodes of `shards` shards each, in this process, over loopback,
/// each with its autoscaler (20 ms steps).
fn nodes_of(shards: usize) -> [Dataflow; 2] {
    use dirigo_engine::runtime::{RemoteConfig, RemoteNode};
    let mut listeners: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port"))
        .collect();
    let nodes: Vec<RemoteNode> = listeners
        .iter()
        .map(|l| RemoteNode {
            addr: l.local_addr().expect("bound"),
            shards: shards as u16,
        })
        .collect();
    let start = |me: usize, listener| {
        let mut config = DataflowConfig::default();
        config.runtime.shards = shards;
        config.runtime.oversubscribe = true;
        config.runtime.pin = false;
        config.autoscale = Some(AutoscaleOptions {
            interval: Duration::from_millis(20),
            ..AutoscaleOptions::default()
        });
        let remote = RemoteConfig {
            nodes: nodes.clone(),
            me,
            listener,
            cluster: "autoscale".into(),
            secret: b"two nodes, two autoscalers".to_vec(),
            incarnation: 1 + me as u64,
        };
        Dataflow::start_remote(config, remote).expect("the node starts")
    };
    let b = start(1, listeners.pop().expect("two"));
    let a = start(0, listeners.pop().expect("two"));
    [a, b]
}

/// Register the job `make` builds on both nodes (the same id on each),
/// then start it from node 0 and wait for it on both; `pack` first moves,
/// on each node, every actor placed on its second shard to its first (a
/// stage's partition `p` is placed on shard `p % 4` of the run). Each
/// node's handle, rows and report.
fn run_over_two_nodes(
    nodes: &mut [Dataflow; 2],
    make: impl Fn() -> (Job, Rows),
    pack: bool,
) -> (Vec<JobHandle>, Vec<Rows>, Vec<JobReport>) {
    let (mut handles, mut rows) = (Vec::new(), Vec::new());
    for node in nodes.iter_mut() {
        let (job, collected) = make();
        handles.push(node.register(job).expect("registers"));
        rows.push(collected);
    }
    assert_eq!(handles[0].id, handles[1].id);
    if pack {
        for (i, node) in nodes.iter().enumerate() {
            let first = 2 * i as u32;
            for actor in node.actors(handles[i].id) {
                if actor.partition % 4 == first + 1 {
                    node.migrate(actor, ShardId(first as u16));
                }
            }
        }
    }
    nodes[0].start_job(&handles[0]).expect("node 0 starts it");
    let reports = nodes
        .iter()
        .zip(&handles)
        .map(|(node, handle)| {
            node.wait(handle, Duration::from_secs(120))
                .expect("the job ends on both nodes")
        })
        .collect();
    (handles, rows, reports)
}

/// A windowed count of `events` readings by 4 partitions, each record
/// costing 500 ns, into 2 sink partitions: the job, and its rows.
fn slow_count(name: &str, events: u64) -> (Job, Rows) {
    let rows: Rows = Default::default();
    let collected = rows.clone();
    let mut job = Job::new(name, Duration::from_millis(200));
    readings::source(&mut job, events)
        .key_by(|r: &(u64, i64)| r.0)
        .window_aggregate(
            "slow-count",
            4,
            WindowSpec::Tumbling { size_ms: WINDOW_MS },
            |r| r.1,
            |r| r.0,
            SlowCount { spin_ns: 500 },
        )
        .sink(
            "out",
            2,
            Arc::new(move |_| Box::new(Collect(collected.clone()))),
        );
    (job, rows)
}

/// Node `i`'s decisions: every move is from one of its own shards, to
/// another of them or, a spill, to another node's shard when nothing of
/// its own relieved the shard (a keyed stage's actor, scaling out); none
/// reroutes unless `i` is node 0.
fn assert_on_own_shards(i: usize, decisions: &[dirigo_engine::autoscale::Decision]) {
    let own = |s: ShardId| usize::from(s.0) / 2 == i;
    for d in decisions {
        match &d.action {
            Action::Move {
                from, to, scale, ..
            } => {
                assert!(own(*from), "node {i} moved off another's shard: {d}");
                assert!(
                    own(*to) || (*scale == Scale::Out && d.reason.contains("(another node's)")),
                    "node {i} moved off its shards other than by a spill: {d}"
                )
            }
            Action::Split { .. } | Action::Merge { .. } => {
                assert_eq!(i, 0, "only node 0 reroutes: {d}")
            }
            Action::Parallel { .. } | Action::Ordered { .. } => {
                panic!("node {i} switched a stage's mode over nodes: {d}")
            }
            _ => {}
        }
    }
}

/// Over two nodes of two shards each, every actor of a slow windowed count
/// packed on each node's first shard: each node's autoscaler spreads its
/// own actors to its other shard (to the other node's only as a spill), and the rows
/// of both nodes' sinks are exactly the reference's. Node 1 runs no
/// source: its count partitions take only records from node 0, which is
/// what tells its autoscaler the job has input.
#[test]
fn over_two_nodes_each_nodes_autoscaler_spreads_its_own_actors_on_its_own_shards() {
    const EVENTS: u64 = 1_000_000;
    let mut nodes = two_nodes();
    let make = || slow_count("spread", EVENTS);
    let (_, rows, reports) = run_over_two_nodes(&mut nodes, make, true);
    let decisions = [nodes[0].decisions(), nodes[1].decisions()];
    for node in nodes {
        node.shutdown();
    }
    for (i, decisions) in decisions.iter().enumerate() {
        assert_on_own_shards(i, decisions);
        let (first, second) = (ShardId(2 * i as u16), ShardId(2 * i as u16 + 1));
        assert!(
            decisions.iter().any(|d| matches!(d.action,
                Action::Move { from, to, scale: Scale::Out, .. } if from == first && to == second)),
            "node {i} spreads its packed shard: {decisions:#?}"
        );
        assert!(
            reports[i].scale_actions >= 1,
            "node {i} counts its actions: {}",
            reports[i].scale_actions
        );
    }
    let mut all: Vec<_> = rows
        .iter()
        .flat_map(|r| r.lock().unwrap().clone())
        .collect();
    all.sort();
    assert_eq!(all, reference(EVENTS), "exact output over both nodes");
}

/// Over two nodes of one shard each, every partition of a slow windowed
/// count packed on node 0's shard with the source: node 0's autoscaler,
/// with no shard of its own to spread to, spills count partitions to node
/// 1's shard, one a step while node 1 tells it has room, and the rows are
/// exactly the reference's.
#[test]
fn over_two_nodes_of_one_shard_a_node_nothing_of_its_own_relieves_spills_to_the_other() {
    const EVENTS: u64 = 1_000_000;
    let mut nodes = nodes_of(1);
    let (mut handles, mut rows) = (Vec::new(), Vec::new());
    for node in nodes.iter_mut() {
        let (job, collected) = slow_count("spill", EVENTS);
        handles.push(node.register(job).expect("registers"));
        rows.push(collected);
    }
    // The count's partitions placed on node 1 (odd ones) go to node 0.
    let count: Vec<_> = nodes[1]
        .actors(handles[1].id)
        .into_iter()
        .filter(|a| a.operator == 1 && a.partition % 2 == 1)
        .collect();
    assert_eq!(count.len(), 2, "{count:?}");
    for actor in &count {
        nodes[1].migrate(*actor, ShardId(0));
    }
    nodes[0].start_job(&handles[0]).expect("node 0 starts it");
    for (node, handle) in nodes.iter().zip(&handles) {
        node.wait(handle, Duration::from_secs(120))
            .expect("the job ends on both nodes");
    }
    let decisions = [nodes[0].decisions(), nodes[1].decisions()];
    // The spills were carried out: node 1's shard took actors in (the
    // moves before the start went the other way).
    let moved_in: u64 = nodes[1]
        .stats()
        .shards
        .iter()
        .filter(|s| s.shard == ShardId(1))
        .map(|s| s.migrations_in)
        .sum();
    for node in nodes {
        node.shutdown();
    }
    let own = |i: usize, s: ShardId| usize::from(s.0) == i;
    for (i, decisions) in decisions.iter().enumerate() {
        for d in decisions {
            if let Action::Move {
                actor,
                from,
                to,
                scale,
            } = d.action
            {
                assert!(own(i, from), "node {i} moved off another's shard: {d}");
                assert_eq!(scale, Scale::Out, "{d}");
                assert!(d.reason.contains("(another node's)"), "{d}");
                assert_eq!(actor.operator, 1, "only the keyed count crosses: {d}");
                assert!(!own(i, to), "{d}");
            }
        }
    }
    let spills = decisions[0]
        .iter()
        .filter(|d| matches!(d.action, Action::Move { to: ShardId(1), .. }))
        .count();
    eprintln!(
        "spill: node 0 spilled {spills}, node 1 {}; {moved_in} actors moved into node 1's shard",
        decisions[1]
            .iter()
            .filter(|d| matches!(d.action, Action::Move { .. }))
            .count()
    );
    assert!(spills >= 1, "node 0 spills to node 1: {:#?}", decisions[0]);
    assert!(moved_in >= 1, "nothing moved into node 1's shard");
    let mut all: Vec<_> = rows
        .iter()
        .flat_map(|r| r.lock().unwrap().clone())
        .collect();
    all.sort();
    assert_eq!(all, reference(EVENTS), "exact output over both nodes");
}

/// Over two nodes, a hot partition no move relieves: on node 0 (partition
/// 0, on its first shard) node 0's autoscaler splits it into partition 1,
/// on its other shard, also when the stage keeps partials (split, never
/// switched to parallel mode over nodes); on node 1 (partition 2) node 1's
/// autoscaler does not reroute (only node 0 orders reroutes) and reports
/// the operator that needs more activations. No move leaves a node but a
/// spill, and the rows are exactly the reference's.
#[test]
fn over_two_nodes_only_node_0s_autoscaler_splits_a_hot_partition_and_into_one_of_its_own() {
    const EVENTS: u64 = 1_000_000;
    for (hot, two_phase) in [(0, false), (0, true), (2, false)] {
        let context = format!("hot partition {hot}, two phases: {two_phase}");
        let mut nodes = two_nodes();
        let expected = hot_job_in(two_phase, EVENTS, hot).2;
        let (handles, rows, _) = run_over_two_nodes(
            &mut nodes,
            || {
                let (job, rows, _) = hot_job_in(two_phase, EVENTS, hot);
                (job, rows)
            },
            false,
        );
        let job = handles[0].id;
        let decisions = [nodes[0].decisions(), nodes[1].decisions()];
        for node in nodes {
            node.shutdown();
        }
        for (i, decisions) in decisions.iter().enumerate() {
            assert_on_own_shards(i, decisions);
        }
        if hot == 0 {
            assert!(
                decisions[0].iter().any(|d| matches!(d.action,
                    Action::Split { actor, into } if actor.job == job && actor.operator == 1
                        && actor.partition == 0 && into.partition == 1)
                    && !d.reason.contains("not carried out")),
                "{context}: node 0 splits partition 0 into partition 1: {:#?}",
                &decisions[0]
            );
        } else {
            assert!(
                decisions[1].iter().any(|d| matches!(&d.action,
                    Action::NeedsParallelism { shard, operators }
                        if *shard == ShardId(2) && !operators.is_empty())),
                "{context}: node 1 reports what needs more activations: {:#?}",
                &decisions[1]
            );
        }
        let mut all: Vec<_> = rows
            .iter()
            .flat_map(|r| r.lock().unwrap().clone())
            .collect();
        all.sort();
        assert_eq!(all, expected, "{context}: exact output over nodes");
    }
}

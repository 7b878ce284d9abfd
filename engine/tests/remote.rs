//! Remote actor sends: two runtimes, each one node of a run, in one process,
//! their gateways connected over loopback TCP (authenticated sessions,
//! sealed frames). Actors on either node send to actors on both; the
//! shared ledger checks every channel exactly, also while actors move
//! between the shards of their node.

mod common;

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dirigo_engine::runtime::{
    MemoryStateStore, RemoteConfig, RemoteNode, RuntimeConfig, ShardConfig, ShardReport, WireValue,
};
use dirigo_engine::{
    Actor, ActorFactory, ActorId, BoxActor, Context, JobId, Runtime, SchedCtx, ShardId,
};

const SECRET: &[u8] = b"a test secret of at least thirty-two bytes";

fn config(shards: usize, credit: u32) -> RuntimeConfig {
    RuntimeConfig {
        shards,
        oversubscribe: true,
        pin: false,
        ring_packets: 256,
        shard: ShardConfig {
            mailbox_credit_messages: credit,
            remote_credit_messages: credit * 3 / 2,
            ..ShardConfig::default()
        },
        ..RuntimeConfig::default()
    }
}

/// Listeners for a run of `nodes` nodes of `shards` shards each.
fn listeners(nodes: usize, shards: u16) -> (Vec<TcpListener>, Vec<RemoteNode>) {
    let listeners: Vec<TcpListener> = (0..nodes)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a loopback port"))
        .collect();
    let run = listeners
        .iter()
        .map(|l| RemoteNode {
            addr: l.local_addr().expect("bound"),
            shards,
        })
        .collect();
    (listeners, run)
}

fn start_node<M: dirigo_engine::runtime::Wire>(
    me: usize,
    listener: TcpListener,
    nodes: &[RemoteNode],
    secret: &[u8],
    factory: Arc<dyn ActorFactory<M>>,
) -> Runtime<M> {
    let config = config(usize::from(nodes[me].shards), 64);
    start_node_with(me, listener, nodes, secret, factory, config)
}

fn start_node_with<M: dirigo_engine::runtime::Wire>(
    me: usize,
    listener: TcpListener,
    nodes: &[RemoteNode],
    secret: &[u8],
    factory: Arc<dyn ActorFactory<M>>,
    config: RuntimeConfig,
) -> Runtime<M> {
    let remote = RemoteConfig {
        nodes: nodes.to_vec(),
        me,
        listener,
        cluster: "remote-test".into(),
        secret: secret.to_vec(),
        incarnation: 1 + me as u64,
    };
    Runtime::start_remote(
        config,
        remote,
        factory,
        Arc::new(MemoryStateStore::default()),
    )
    .expect("the node's runtime starts")
}

/// Nodes 0 and 1 of a run of two nodes of two shards each (node 1
/// started first), both with `factory` and `config`.
fn start_two_nodes<M: dirigo_engine::runtime::Wire>(
    factory: Arc<dyn ActorFactory<M>>,
    config: RuntimeConfig,
) -> (Runtime<M>, Runtime<M>) {
    let shards = config.shards as u16;
    let (mut ls, nodes) = listeners(2, shards);
    let start = |me, listener| {
        start_node_with(
            me,
            listener,
            &nodes,
            SECRET,
            factory.clone(),
            config.clone(),
        )
    };
    let b = start(1, ls.pop().unwrap());
    let a = start(0, ls.pop().unwrap());
    (a, b)
}

/// Two nodes of two shards each (node 1 started first) running the
/// workload's actors with `config`, every source ticked through node 0
/// (those homed on node 1 get their tick through the gateway).
fn two_nodes(workload: &Workload, config: RuntimeConfig) -> (Built, Runtime<Msg>, Runtime<Msg>) {
    let built = build(workload);
    let (a, b) = start_two_nodes(built.factory.clone(), config);
    for s in 0..workload.sources {
        a.send(source(s), Msg::Tick, sched()).expect("shard alive");
    }
    (built, a, b)
}

/// A shard counter summed over both nodes.
fn sum_over_shards<M: Send + 'static>(
    nodes: [&Runtime<M>; 2],
    count: impl Fn(&ShardReport) -> u64,
) -> u64 {
    nodes
        .iter()
        .flat_map(|node| node.stats().shards)
        .map(|s| count(&s))
        .sum()
}

/// Until every message of `workload` arrived (at most 120 s), ask node
/// `a` or `b` at random to move a random actor to a random shard of the
/// run (of its own node or of the other), every `pause`.
fn move_at_random_until_done(
    a: &Runtime<Msg>,
    b: &Runtime<Msg>,
    ledger: &Ledger,
    workload: &Workload,
    seed: u64,
    pause: Duration,
) {
    let total = workload.per_channel * u64::from(workload.sources * workload.targets);
    let mut rng = dirigo_engine::runtime::sim::SimRng::new(seed);
    let start = Instant::now();
    while ledger.received.load(Ordering::Acquire) < total {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "stuck at {} of {total}",
            ledger.received.load(Ordering::Acquire)
        );
        let pick = rng.below(u64::from(workload.sources + workload.targets)) as u32;
        let actor = if pick < workload.sources {
            source(pick)
        } else {
            target(pick - workload.sources)
        };
        let node = if rng.below(2) == 0 { a } else { b };
        let to = ShardId(rng.below(a.total_shards() as u64) as u16);
        node.migrate(actor, to).expect("alive");
        std::thread::sleep(pause);
    }
}

#[test]
fn actors_on_two_nodes_exchange_messages_exactly_in_order_while_they_move_within_and_across_nodes()
{
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 10_000,
        batch: 64,
        target_spin_ns: 0,
    };
    let (built, a, b) = two_nodes(&workload, config(2, 64));
    assert_eq!((a.first_shard(), b.first_shard()), (ShardId(0), ShardId(2)));
    assert_eq!((a.total_shards(), a.shards()), (4, 2));
    move_at_random_until_done(
        &a,
        &b,
        &built.ledger,
        &workload,
        7,
        Duration::from_millis(1),
    );
    built.ledger.assert_complete(workload.per_channel);
    for (name, node) in [("node 0", &a), ("node 1", &b)] {
        let remote = node.remote_stats().expect("a remote run");
        assert!(
            remote.messages_out > 0 && remote.messages_in > 0,
            "{name} sent and took messages: {remote:?}"
        );
        assert_eq!((remote.oversized, remote.refused), (0, 0), "{name}");
        let stats = node.stats();
        assert!(stats.dead.is_empty());
        let moved: u64 = stats.shards.iter().map(|s| s.migrations_in).sum();
        let from_nodes: u64 = stats
            .shards
            .iter()
            .map(|s| s.migrations_in_from_nodes)
            .sum();
        assert!(moved > from_nodes, "{name} moved actors among its shards");
        assert!(from_nodes > 0, "{name} took actors from the other node");
        assert!(stats
            .shards
            .iter()
            .all(|s| (s.shard.0 >= node.first_shard().0) && s.shard.0 < node.first_shard().0 + 2));
    }
    a.shutdown();
    b.shutdown();
}

/// Nodes of one shard each run their gateway's tasks on that shard's
/// executor: every message still arrives once and in order while actors
/// move between the two nodes (the only shards there are).
#[test]
fn actors_on_two_nodes_of_one_shard_each_exchange_messages_exactly_while_they_move_across() {
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 10_000,
        batch: 64,
        target_spin_ns: 0,
    };
    let (built, a, b) = two_nodes(&workload, config(1, 64));
    assert_eq!((a.first_shard(), b.first_shard()), (ShardId(0), ShardId(1)));
    assert_eq!((a.total_shards(), a.shards()), (2, 1));
    move_at_random_until_done(
        &a,
        &b,
        &built.ledger,
        &workload,
        11,
        Duration::from_millis(1),
    );
    built.ledger.assert_complete(workload.per_channel);
    for (name, node) in [("node 0", &a), ("node 1", &b)] {
        let remote = node.remote_stats().expect("a remote run");
        assert!(
            remote.messages_out > 0 && remote.messages_in > 0,
            "{name} sent and took messages: {remote:?}"
        );
        assert_eq!((remote.oversized, remote.refused), (0, 0), "{name}");
        let stats = node.stats();
        assert!(stats.dead.is_empty());
        let from_nodes: u64 = stats
            .shards
            .iter()
            .map(|s| s.migrations_in_from_nodes)
            .sum();
        assert!(from_nodes > 0, "{name} took actors from the other node");
    }
    a.shutdown();
    b.shutdown();
}

/// What the probe saw of one message.
#[derive(Clone, Copy, Debug)]
struct Seen {
    sched: SchedCtx,
    now_ns: u64,
    shard: ShardId,
}

#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Probe(u64);

impl WireValue for Probe {}

struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Actor for Recorder {
    type Message = Probe;

    fn handle(&mut self, _message: Probe, ctx: &mut Context<'_, Probe>) {
        self.0.lock().unwrap().push(Seen {
            sched: ctx.sched(),
            now_ns: ctx.now_ns(),
            shard: ctx.shard(),
        });
    }

    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }
}

fn recorder(seen: Arc<Mutex<Vec<Seen>>>) -> Arc<dyn ActorFactory<Probe>> {
    Arc::new(move |_: ActorId, _: Option<&[u8]>| -> BoxActor<Probe> {
        Box::new(Recorder(seen.clone()))
    })
}

#[test]
fn a_deadline_crosses_nodes_as_the_slack_left() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (mut ls, nodes) = listeners(2, 1);
    let b = start_node(1, ls.pop().unwrap(), &nodes, SECRET, recorder(seen.clone()));
    let a = start_node(0, ls.pop().unwrap(), &nodes, SECRET, recorder(seen.clone()));
    // Partition 1 lives on shard 1: node 1's.
    let far = ActorId::new(JobId(9), 1, 1);
    let clock = dirigo_engine::clock::Clock::Monotonic;
    let mut sent = Vec::new();
    for i in 0..20 {
        let now = clock.now_ns();
        let sched = SchedCtx {
            job: JobId(9),
            deadline_ns: now + 50_000_000,
            origin_ns: now,
        };
        a.send(far, Probe(i), sched).expect("alive");
        sent.push(sched);
    }
    let start = Instant::now();
    while seen.lock().unwrap().len() < sent.len() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "probes not delivered"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let seen = seen.lock().unwrap();
    for (s, got) in sent.iter().zip(seen.iter()) {
        assert_eq!(got.shard, ShardId(1));
        assert_eq!(got.sched.job, JobId(9));
        // The slack is re-based on the taking node's clock: never more than
        // it was when sent, the time between the gateways not charged (so
        // the deadline only moves later on one shared clock, by that time).
        let slack_left = got.sched.deadline_ns as i128 - got.now_ns as i128;
        assert!(slack_left <= 50_000_000, "{got:?}");
        assert!(got.sched.deadline_ns >= s.deadline_ns, "{got:?} {s:?}");
        assert!(got.sched.deadline_ns - s.deadline_ns < 5_000_000_000);
        // The age carries over: the origin is in the taker's past.
        assert!(got.sched.origin_ns >= s.origin_ns && got.sched.origin_ns <= got.now_ns);
        assert_eq!(
            got.sched.deadline_ns - got.sched.origin_ns,
            50_000_000,
            "slack plus age is what the sender gave"
        );
    }
    a.shutdown();
    b.shutdown();
}

#[test]
fn a_node_with_the_wrong_secret_gets_nothing_across() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (mut ls, nodes) = listeners(2, 1);
    let wrong: Vec<u8> = SECRET.iter().map(|b| b ^ 1).collect();
    let b = start_node(1, ls.pop().unwrap(), &nodes, &wrong, recorder(seen.clone()));
    let a = start_node(0, ls.pop().unwrap(), &nodes, SECRET, recorder(seen.clone()));
    let far = ActorId::new(JobId(9), 1, 1);
    let near = ActorId::new(JobId(9), 1, 0);
    let sched = SchedCtx::default();
    for i in 0..10 {
        a.send(far, Probe(i), sched).expect("alive");
    }
    a.send(near, Probe(99), sched).expect("alive");
    std::thread::sleep(Duration::from_millis(500));
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "only the local probe: {got:?}");
    assert_eq!(got[0].shard, ShardId(0));
    let (ra, rb) = (a.remote_stats().unwrap(), b.remote_stats().unwrap());
    assert_eq!((ra.frames_in, rb.frames_in, rb.messages_in), (0, 0, 0));
    a.shutdown();
    b.shutdown();
}

/// A node that starts sending before its peer runs fills its session
/// (nothing is acked: 32 targets on the other node with credit for 1,024
/// messages each from each shard, far over the session's 64 frames) and
/// must wait without holding its thread, so that it connects once the
/// peer is up and everything then arrives exactly.
#[test]
fn sends_made_before_the_peer_runs_arrive_once_it_does() {
    let workload = Workload {
        sources: 4,
        targets: 64,
        per_channel: 2_000,
        batch: 64,
        target_spin_ns: 0,
    };
    let built = build(&workload);
    let (mut ls, nodes) = listeners(2, 2);
    let b_listener = ls.pop().unwrap();
    let a = start_node_with(
        0,
        ls.pop().unwrap(),
        &nodes,
        SECRET,
        built.factory.clone(),
        config(2, 1024),
    );
    for s in 0..workload.sources {
        a.send(source(s), Msg::Tick, sched()).expect("shard alive");
    }
    // Node 0's sources run; half of what they send is for node 1, which is
    // not up: far more than the session holds.
    std::thread::sleep(Duration::from_millis(300));
    let received = built.ledger.received.load(Ordering::Acquire);
    let total = workload.per_channel * u64::from(workload.sources * workload.targets);
    assert!(received < total, "nothing can be complete yet");
    let b = start_node_with(
        1,
        b_listener,
        &nodes,
        SECRET,
        built.factory.clone(),
        config(2, 1024),
    );
    wait_for(&built.ledger, total, Duration::from_secs(60));
    built.ledger.assert_complete(workload.per_channel);
    a.shutdown();
    b.shutdown();
}

/// A slow target makes senders on both nodes wait: its mailbox holds at
/// most the local credit from each shard of its node and the remote
/// credit from each shard of the other (32 and 48 here), and every
/// message still arrives, in order.
#[test]
fn a_slow_actor_bounds_what_both_nodes_send_it() {
    let credit = 32u32;
    let workload = Workload {
        sources: 4,
        targets: 4,
        per_channel: 1_500,
        batch: 16,
        target_spin_ns: 20_000,
    };
    let (built, a, b) = two_nodes(&workload, config(2, credit));
    let total = workload.per_channel * u64::from(workload.sources * workload.targets);
    let start = Instant::now();
    let mut max_mailbox = 0;
    while built.ledger.received.load(Ordering::Acquire) < total {
        assert!(start.elapsed() < Duration::from_secs(60), "stuck");
        for node in [&a, &b] {
            for shard in node.stats().shards {
                for actor in shard.actors {
                    max_mailbox = max_mailbox.max(actor.mailbox + actor.early);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    built.ledger.assert_complete(workload.per_channel);
    let bound = 2 * credit as usize + 2 * (credit * 3 / 2) as usize;
    assert!(
        max_mailbox <= bound,
        "a mailbox grew to {max_mailbox} > {bound}"
    );
    assert!(max_mailbox > 0, "the targets were slow enough to queue");
    a.shutdown();
    b.shutdown();
}

/// Actors move between the nodes many times while slow targets keep
/// their mailboxes full: what a moving actor held (its mailbox, early
/// arrivals, blocked sends, channel tables, a source's count) goes with
/// it, and every channel stays exact and in order. (A move of an actor
/// holding over 64 messages is refused and it goes on where it was: in
/// three runs on the 2-core VM about 200 moves crossed and 55 were
/// refused.)
#[test]
fn actors_with_full_mailboxes_move_between_nodes_exactly() {
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 2_500,
        batch: 32,
        target_spin_ns: 2_000,
    };
    let (built, a, b) = two_nodes(&workload, config(2, 64));
    move_at_random_until_done(
        &a,
        &b,
        &built.ledger,
        &workload,
        11,
        Duration::from_micros(300),
    );
    built.ledger.assert_complete(workload.per_channel);
    let across = sum_over_shards([&a, &b], |s| s.migrations_in_from_nodes);
    assert!(across >= 20, "only {across} moves across nodes");
    a.shutdown();
    b.shutdown();
}

/// An actor deactivated on one node (its state in that node's store)
/// moves to the other by value: a finished source, moved and ticked
/// again, sends nothing more (its count came with it; a source that
/// lost it would send every message again, which the ledger catches).
#[test]
fn a_deactivated_actor_moves_to_the_other_node_with_its_state() {
    let workload = Workload {
        sources: 4,
        targets: 4,
        per_channel: 500,
        batch: 32,
        target_spin_ns: 0,
    };
    let mut config = config(2, 64);
    config.shard.idle_timeout_ns = Some(20_000_000);
    config.housekeeping_interval = Duration::from_millis(5);
    let (built, a, b) = two_nodes(&workload, config);
    let total = workload.per_channel * u64::from(workload.sources * workload.targets);
    wait_for(&built.ledger, total, Duration::from_secs(60));
    // Wait until every actor went idle and was deactivated.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = sum_over_shards([&a, &b], |s| s.actors.len() as u64);
        if active == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{active} actors still active");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Each source to a shard of the other node than its home's.
    for s in 0..workload.sources {
        let other = (s + 2) % 4;
        a.migrate(source(s), ShardId(other as u16)).expect("alive");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let across = sum_over_shards([&a, &b], |s| s.migrations_in_from_nodes);
        if across == u64::from(workload.sources) {
            break;
        }
        assert!(Instant::now() < deadline, "{across} sources moved");
        std::thread::sleep(Duration::from_millis(5));
    }
    for s in 0..workload.sources {
        a.send(source(s), Msg::Tick, sched()).expect("alive");
    }
    std::thread::sleep(Duration::from_millis(200));
    built.ledger.assert_complete(workload.per_channel);
    a.shutdown();
    b.shutdown();
}

/// A node of the run that stops: the other sees its session drop, its
/// senders to the lost node's actors wait (nothing of theirs is lost or
/// delivered twice), and it still shuts down promptly.
#[test]
fn a_node_that_stops_is_seen_disconnected_and_the_other_stops_cleanly() {
    let workload = Workload {
        sources: 4,
        targets: 8,
        per_channel: 1_000_000,
        batch: 64,
        target_spin_ns: 0,
    };
    let (built, a, b) = two_nodes(&workload, config(2, 64));
    wait_for(&built.ledger, 50_000, Duration::from_secs(60));
    assert_eq!(a.remote_stats().unwrap().connected, vec![true, true]);
    b.shutdown();
    let start = Instant::now();
    while a.remote_stats().unwrap().connected[1] {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node 1 still seen connected"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // What arrived, arrived once and in order.
    assert!(built.ledger.violations.lock().unwrap().is_empty());
    let stopping = Instant::now();
    a.shutdown();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
enum Big {
    /// The pusher: send this many more.
    Go(u32),
    Data(Vec<u8>),
    /// The keeper: take a state of this many bytes.
    Fill(u32),
    /// The keeper: check its state and say where it is.
    Check,
}

impl WireValue for Big {}

/// A pusher that sends `Big::Data` of `bytes` each to the sink in chunks of
/// 8; a sink that takes its time with each; a keeper that holds a large
/// state (its snapshot) and checks it.
struct BigActor {
    me: ActorId,
    sink: ActorId,
    bytes: usize,
    /// How long the sink takes with each message.
    spin: Duration,
    handled: Arc<std::sync::atomic::AtomicU64>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    state: Vec<u8>,
    checks: Arc<Mutex<Vec<(ShardId, usize, bool)>>>,
}

/// The keeper's state: byte `i` of `len` is `i * 7 % 251`.
fn kept(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

impl Actor for BigActor {
    type Message = Big;

    fn handle(&mut self, message: Big, ctx: &mut Context<'_, Big>) {
        match message {
            Big::Go(left) => {
                let chunk = left.min(8);
                for _ in 0..chunk {
                    ctx.send(self.sink, Big::Data(vec![7; self.bytes]));
                }
                if left > chunk {
                    ctx.send(self.me, Big::Go(left - chunk));
                } else {
                    self.finished.store(true, Ordering::Release);
                }
            }
            Big::Data(bytes) => {
                assert_eq!(bytes.len(), self.bytes);
                let until = Instant::now() + self.spin;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                self.handled.fetch_add(1, Ordering::AcqRel);
            }
            Big::Fill(len) => self.state = kept(len as usize),
            Big::Check => self.checks.lock().unwrap().push((
                ctx.shard(),
                self.state.len(),
                self.state == kept(self.state.len()),
            )),
        }
    }

    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        let mut bytes = dirigo_engine::StateBytes::new();
        bytes.extend_from_slice(&self.state);
        (!self.state.is_empty()).then_some(bytes)
    }
}

/// The pusher of the tests with a pusher and a sink: shard 1 (node 0).
const PUSHER: ActorId = ActorId::new(JobId(5), 1, 1);
/// Their sink: shard 2 (node 1).
const SINK: ActorId = ActorId::new(JobId(5), 2, 2);

struct Big2 {
    a: Runtime<Big>,
    b: Runtime<Big>,
    handled: Arc<std::sync::atomic::AtomicU64>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    failures: Arc<Mutex<Vec<dirigo_engine::runtime::Failure>>>,
    checks: Arc<Mutex<Vec<(ShardId, usize, bool)>>>,
}

/// Two nodes of two shards each with `credit` (the remote credit half as
/// much again), running `BigActor`s whose pusher sends `bytes` a message
/// to `sink`, which takes `spin` with each.
fn big_nodes(credit: u32, sink: ActorId, bytes: usize, spin: Duration) -> Big2 {
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let checks = Arc::new(Mutex::new(Vec::new()));
    let factory: Arc<dyn ActorFactory<Big>> = {
        let (handled, finished, checks) = (handled.clone(), finished.clone(), checks.clone());
        Arc::new(move |me: ActorId, state: Option<&[u8]>| -> BoxActor<Big> {
            Box::new(BigActor {
                me,
                sink,
                bytes,
                spin,
                handled: handled.clone(),
                finished: finished.clone(),
                state: state.map(<[u8]>::to_vec).unwrap_or_default(),
                checks: checks.clone(),
            })
        })
    };
    let mut config = config(2, credit);
    let seen = failures.clone();
    config.on_failure = Some(Arc::new(move |f| seen.lock().unwrap().push(f)));
    let (a, b) = start_two_nodes(factory, config);
    Big2 {
        a,
        b,
        handled,
        finished,
        failures,
        checks,
    }
}

impl Big2 {
    /// The pusher on shard 1 (node 0) sends `sent` messages to the sink on
    /// shard 2 (node 1); once the sink holds `queued` or more, node 1
    /// moves it to shard 0 (node 0).
    fn push_and_move_the_sink(&self, sent: u64, queued: usize) {
        self.a
            .send(PUSHER, Big::Go(sent as u32), sched())
            .expect("alive");
        self.wait_until_holding(SINK, queued);
        self.b.migrate(SINK, ShardId(0)).expect("alive");
    }

    /// Until `actor`, on node 1, holds `queued` messages or more.
    fn wait_until_holding(&self, actor: ActorId, queued: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let holds = self
                .b
                .stats()
                .shards
                .iter()
                .flat_map(|s| s.actors.iter())
                .filter(|a| a.id == actor)
                .map(|a| a.mailbox + a.early)
                .sum::<usize>();
            if holds >= queued {
                return;
            }
            assert!(Instant::now() < deadline, "{actor} holds only {holds}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Until the pusher finished and each of `sent` messages was handled
    /// or counted dropped; the number dropped.
    fn wait_until_all_accounted(&self, sent: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let dropped = || sum_over_shards([&self.a, &self.b], |s| s.dropped);
        loop {
            let handled = self.handled.load(Ordering::Acquire);
            let finished = self.finished.load(Ordering::Acquire);
            if finished && handled + dropped() >= sent {
                assert_eq!(handled + dropped(), sent);
                return dropped();
            }
            assert!(
                Instant::now() < deadline,
                "pusher finished: {finished}, handled {handled} and dropped {} of {sent}",
                dropped()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A move over a frame (40 and more queued messages of 8 KiB each, over
/// 256 KiB encoded) crosses in parts: the sink goes on at its new place
/// and handles every message once.
#[test]
fn a_move_over_a_frame_crosses_in_parts_with_everything_it_held() {
    let nodes = big_nodes(40, SINK, 8 * 1024, Duration::from_micros(300));
    const SENT: u64 = 400;
    nodes.push_and_move_the_sink(SENT, 40);
    assert_eq!(nodes.wait_until_all_accounted(SENT), 0, "nothing dropped");
    assert_eq!(nodes.handled.load(Ordering::Acquire), SENT);
    let remote = nodes.b.remote_stats().unwrap();
    assert!(remote.handoff_parts_out >= 2, "{remote:?}");
    assert_eq!(remote.oversized, 0);
    assert_eq!(nodes.a.remote_stats().unwrap().refused, 0);
    assert_eq!(
        sum_over_shards([&nodes.a, &nodes.b], |s| s.migrations_in_from_nodes),
        1
    );
    assert!(nodes.failures.lock().unwrap().is_empty());
    nodes.a.shutdown();
    nodes.b.shutdown();
}

/// Messages of 1 MiB each (four frames' worth) cross in parts: every one
/// arrives once, whole, the sink never moving.
#[test]
fn messages_over_a_frame_cross_in_parts_each_once() {
    let nodes = big_nodes(8, SINK, 1 << 20, Duration::ZERO);
    const SENT: u64 = 40;
    nodes
        .a
        .send(PUSHER, Big::Go(SENT as u32), sched())
        .expect("alive");
    assert_eq!(nodes.wait_until_all_accounted(SENT), 0, "nothing dropped");
    assert_eq!(nodes.handled.load(Ordering::Acquire), SENT);
    let remote = nodes.a.remote_stats().unwrap();
    assert!(remote.message_parts_out >= 4 * SENT, "{remote:?}");
    assert_eq!(remote.oversized, 0);
    assert_eq!(nodes.b.remote_stats().unwrap().refused, 0);
    assert!(nodes.failures.lock().unwrap().is_empty());
    nodes.a.shutdown();
    nodes.b.shutdown();
}

/// An actor with a state of 4 MiB (far over a frame) moves to the other
/// node in parts and has all of it there.
#[test]
fn an_actor_with_a_large_state_moves_to_the_other_node_whole() {
    let keeper = ActorId::new(JobId(5), 3, 2); // shard 2: node 1
    let nodes = big_nodes(64, keeper, 0, Duration::ZERO);
    nodes
        .a
        .send(keeper, Big::Fill(4 << 20), sched())
        .expect("alive");
    nodes.a.send(keeper, Big::Check, sched()).expect("alive");
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.checks.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no check");
        std::thread::sleep(Duration::from_millis(1));
    }
    nodes.b.migrate(keeper, ShardId(1)).expect("alive");
    while sum_over_shards([&nodes.a, &nodes.b], |s| s.migrations_in_from_nodes) == 0 {
        assert!(Instant::now() < deadline, "not moved");
        std::thread::sleep(Duration::from_millis(1));
    }
    nodes.a.send(keeper, Big::Check, sched()).expect("alive");
    while nodes.checks.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no check after the move");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        *nodes.checks.lock().unwrap(),
        vec![(ShardId(2), 4 << 20, true), (ShardId(1), 4 << 20, true)]
    );
    assert!(nodes.b.remote_stats().unwrap().handoff_parts_out >= 16);
    nodes.a.shutdown();
    nodes.b.shutdown();
}

/// A move over what crosses even in parts (over 32 MiB encoded: 170 and
/// more queued messages of 200 KiB each) cannot cross: the actor is lost,
/// and the new owner learns it from a small packet sent in its place. Its
/// place is there, as a failed actor: the credits its messages held go
/// back (the pusher, on the other shard of the new owner's node, has a
/// local credit below what it has out and finishes only with them),
/// every message is either handled or counted dropped, and later moves of
/// it stop there instead of bouncing between nodes.
#[test]
fn a_move_too_large_to_cross_loses_the_actor_and_returns_its_credits() {
    let sink = SINK;
    let nodes = big_nodes(160, sink, 200 * 1024, Duration::from_millis(5));
    const SENT: u64 = 400;
    // 180 held when the move is asked, so that 170 are still there when it
    // is made (the sink handles one every 5 ms meanwhile: at 170 asked, a
    // run moved 169).
    nodes.push_and_move_the_sink(SENT, 180);
    let dropped = nodes.wait_until_all_accounted(SENT);
    assert!(
        dropped >= 170,
        "the lost mailbox is counted dropped ({dropped})"
    );
    assert!(nodes.b.remote_stats().unwrap().oversized >= 170);
    let told: Vec<(Option<ActorId>, ShardId)> = nodes
        .failures
        .lock()
        .unwrap()
        .iter()
        .map(|f| (f.actor, f.shard))
        .collect();
    assert!(
        told.contains(&(Some(sink), ShardId(0))),
        "the new owner holds it as failed: {told:?}"
    );
    assert_eq!(
        sum_over_shards([&nodes.a, &nodes.b], |s| s.migrations_in_from_nodes),
        0
    );
    // Later moves, asked of either node, end at its new place.
    nodes.a.migrate(sink, ShardId(3)).expect("alive");
    nodes.b.migrate(sink, ShardId(1)).expect("alive");
    std::thread::sleep(Duration::from_millis(200));
    let frames = || {
        let (ra, rb) = (
            nodes.a.remote_stats().unwrap(),
            nodes.b.remote_stats().unwrap(),
        );
        ra.frames_out + rb.frames_out
    };
    let before = frames();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        frames(),
        before,
        "nothing goes on crossing once all is done"
    );
    nodes.a.shutdown();
    nodes.b.shutdown();
}

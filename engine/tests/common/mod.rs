//! Test actors shared by the runtime tests: sources that stream numbered messages
//! to targets, and targets that check every channel against a shared ledger.
//!
//! The ledger is outside the actors, so it catches a lost, duplicated or
//! reordered message whatever happens to the actors' own state when they move.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use dirigo_engine::runtime::{MemoryStateStore, RuntimeConfig};
use dirigo_engine::{Actor, ActorId, BoxActor, Context, JobId, Runtime, SchedCtx};

pub const JOB: JobId = JobId(1);
pub const SOURCES: u32 = 1;
pub const TARGETS: u32 = 2;

pub fn source(i: u32) -> ActorId {
    ActorId::new(JOB, SOURCES, i)
}

pub fn target(i: u32) -> ActorId {
    ActorId::new(JOB, TARGETS, i)
}

pub fn sched() -> SchedCtx {
    SchedCtx {
        job: JOB,
        deadline_ns: u64::MAX,
        origin_ns: 0,
    }
}

#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Msg {
    /// Sources: start (or keep) producing.
    Tick,
    /// Targets: the n-th message (from 1) from `source` to this target.
    Data { source: u32, n: u64 },
}

impl dirigo_engine::runtime::WireValue for Msg {}

/// What every channel `(source, target)` has delivered so far.
pub struct Ledger {
    pub sources: u32,
    pub targets: u32,
    last: Vec<AtomicU64>,
    pub received: AtomicU64,
    pub violations: Mutex<Vec<String>>,
}

impl Ledger {
    pub fn new(sources: u32, targets: u32) -> Arc<Self> {
        Arc::new(Ledger {
            sources,
            targets,
            last: (0..sources * targets).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicU64::new(0),
            violations: Mutex::new(Vec::new()),
        })
    }

    fn record(&self, target: u32, source: u32, n: u64) {
        let previous =
            self.last[(target * self.sources + source) as usize].swap(n, Ordering::AcqRel);
        if previous + 1 != n {
            let mut violations = self.violations.lock().unwrap();
            if violations.len() < 20 {
                violations.push(format!(
                    "target {target} got #{n} from source {source} right after #{previous}"
                ));
            }
        }
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    pub fn last(&self, target: u32, source: u32) -> u64 {
        self.last[(target * self.sources + source) as usize].load(Ordering::Acquire)
    }

    /// Every channel delivered exactly `per_channel` messages, in order.
    pub fn assert_complete(&self, per_channel: u64) {
        let violations = self.violations.lock().unwrap();
        assert!(violations.is_empty(), "order violations: {violations:#?}");
        for t in 0..self.targets {
            for s in 0..self.sources {
                assert_eq!(
                    self.last(t, s),
                    per_channel,
                    "channel source {s} -> target {t}"
                );
            }
        }
        assert_eq!(
            self.received.load(Ordering::Acquire),
            per_channel * (self.sources * self.targets) as u64
        );
    }
}

/// Sends `per_target` numbered messages to each of `targets` targets, round-robin,
/// `batch` per turn, re-arming itself with a self-sent `Tick`.
pub struct Source {
    pub index: u32,
    pub targets: u32,
    pub per_target: u64,
    pub batch: u32,
    pub sent: u64,
    pub sent_total: Arc<AtomicU64>,
}

impl Actor for Source {
    type Message = Msg;

    fn handle(&mut self, message: Msg, ctx: &mut Context<'_, Msg>) {
        let Msg::Tick = message else {
            panic!("source got {message:?}");
        };
        let total = self.per_target * self.targets as u64;
        for _ in 0..self.batch {
            if self.sent == total {
                return;
            }
            let to = (self.sent % self.targets as u64) as u32;
            let n = self.sent / self.targets as u64 + 1;
            ctx.send(
                target(to),
                Msg::Data {
                    source: self.index,
                    n,
                },
            );
            self.sent += 1;
            self.sent_total.fetch_add(1, Ordering::AcqRel);
        }
        if self.sent < total {
            ctx.send(ctx.me(), Msg::Tick);
        }
    }

    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        Some(dirigo_engine::encode_state(&self.sent))
    }
}

/// Checks and records every message; optionally spins to be slow.
pub struct Target {
    pub index: u32,
    pub ledger: Arc<Ledger>,
    pub spin_ns: u64,
}

impl Actor for Target {
    type Message = Msg;
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }

    fn handle(&mut self, message: Msg, _ctx: &mut Context<'_, Msg>) {
        let Msg::Data { source, n } = message else {
            panic!("target got {message:?}");
        };
        if self.spin_ns > 0 {
            let start = std::time::Instant::now();
            while (start.elapsed().as_nanos() as u64) < self.spin_ns {
                std::hint::spin_loop();
            }
        }
        self.ledger.record(self.index, source, n);
    }
}

pub struct Workload {
    pub sources: u32,
    pub targets: u32,
    pub per_channel: u64,
    pub batch: u32,
    pub target_spin_ns: u64,
}

pub struct Built {
    pub ledger: Arc<Ledger>,
    pub sent_total: Arc<AtomicU64>,
    pub factory: Arc<dyn dirigo_engine::ActorFactory<Msg>>,
}

pub fn build(workload: &Workload) -> Built {
    let ledger = Ledger::new(workload.sources, workload.targets);
    let sent_total = Arc::new(AtomicU64::new(0));
    let (l, s) = (ledger.clone(), sent_total.clone());
    let targets = workload.targets;
    let per_target = workload.per_channel;
    let batch = workload.batch;
    let spin_ns = workload.target_spin_ns;
    let factory = move |id: ActorId, state: Option<&[u8]>| -> BoxActor<Msg> {
        match id.operator {
            SOURCES => Box::new(Source {
                index: id.partition,
                targets,
                per_target,
                batch,
                sent: state.map_or(0, |bytes| {
                    dirigo_engine::decode_state::<u64>(bytes).expect("valid source state")
                }),
                sent_total: s.clone(),
            }),
            TARGETS => Box::new(Target {
                index: id.partition,
                ledger: l.clone(),
                spin_ns,
            }),
            other => panic!("no operator {other}"),
        }
    };
    Built {
        ledger,
        sent_total,
        factory: Arc::new(factory),
    }
}

/// Wait until `total` messages were received, at most `limit`.
pub fn wait_for(ledger: &Ledger, total: u64, limit: Duration) {
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

/// Start a runtime of `config` on the workload's actors and tick its sources.
pub fn start(workload: &Workload, config: RuntimeConfig) -> (Runtime<Msg>, Built) {
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

//! The autoscaler in a running engine: a thread that, every
//! [`AutoscaleOptions::interval`], reads the runtime's accounting, turns the
//! cumulative per-actor counters into one interval's [`Sample`], steps the
//! model ([`crate::autoscale`]) and carries out its moves as migrations.
//!
//! Each decision is counted for its job ([`super::JobReport::scale_actions`])
//! and kept in a bounded log ([`Dataflow::decisions`](super::Dataflow)); with
//! [`AutoscaleOptions::log_decisions`] it is also printed to stderr as it is
//! made.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::autoscale::{Action, ActorSample, AutoscaleConfig, Autoscaler, Decision, Sample};
use crate::ids::{ActorId, ShardId, INJECTOR_OPERATOR};
use crate::runtime::stats::Counters;
use crate::runtime::Runtime;

use super::{DataMsg, Registry};

/// Steps a slot's last counters are kept while its shard does not report it.
const SEEN_STEPS_KEPT: u64 = 20;

/// Decisions kept for [`super::Dataflow::decisions`]; older ones are dropped.
pub const DECISIONS_KEPT_MAX: usize = 4096;

/// How the engine runs its autoscaler.
#[derive(Clone, Debug)]
pub struct AutoscaleOptions {
    /// Time between two steps.
    pub interval: Duration,
    pub model: AutoscaleConfig,
    /// Print each decision to stderr as it is made.
    pub log_decisions: bool,
}

impl Default for AutoscaleOptions {
    fn default() -> Self {
        AutoscaleOptions {
            interval: Duration::from_millis(50),
            model: AutoscaleConfig::default(),
            log_decisions: false,
        }
    }
}

/// The running autoscaler thread.
pub(crate) struct Driver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub(crate) decisions: Arc<Mutex<VecDeque<Decision>>>,
}

/// An actor's cumulative counters on one shard when last reported. Counters
/// belong to the actor's slot on a shard: they start at zero when it arrives
/// (moved, or made anew after a deactivation), and a shard may report the
/// slot it left for a while, so each (actor, shard) is followed on its own.
struct Seen {
    /// The step it was last reported at.
    step: u64,
    cpu_ns: u64,
    messages: u64,
    queue_us: Histogram<u32>,
}

impl Driver {
    pub(crate) fn start(
        options: AutoscaleOptions,
        runtime: Arc<Runtime<DataMsg>>,
        registry: Registry,
    ) -> Driver {
        let stop = Arc::new(AtomicBool::new(false));
        let decisions = Arc::new(Mutex::new(VecDeque::new()));
        let thread = {
            let (stop, decisions) = (stop.clone(), decisions.clone());
            std::thread::Builder::new()
                .name("dirigo-autoscaler".into())
                .spawn(move || run(options, &runtime, &registry, &stop, &decisions))
                .expect("the autoscaler thread starts")
        };
        Driver {
            stop,
            thread: Some(thread),
            decisions,
        }
    }

    /// Stop the thread and wait for it.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    options: AutoscaleOptions,
    runtime: &Runtime<DataMsg>,
    registry: &Registry,
    stop: &AtomicBool,
    decisions: &Mutex<VecDeque<Decision>>,
) {
    let mut model = Autoscaler::new(options.model.clone());
    let mut seen: BTreeMap<(ActorId, ShardId), Seen> = BTreeMap::new();
    let mut step = 0u64;
    let mut reported_at: BTreeMap<ShardId, u64> = BTreeMap::new();
    let mut last = Instant::now();
    loop {
        let next = last + options.interval;
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::park_timeout(next - now);
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        let stats = runtime.stats();
        let now = Instant::now();
        let elapsed_ns = now.duration_since(last).as_nanos() as u64;
        last = now;
        let mut sample = Sample {
            shards: runtime.shards(),
            dead: stats.dead.clone(),
            actors: Vec::new(),
            jobs: registry.scaling_view(),
        };
        step += 1;
        for report in &stats.shards {
            // The time between this shard's two reports, on its clock (a
            // shard busy in a long turn answers late).
            let interval_ns = match reported_at.insert(report.shard, report.at_ns) {
                Some(before) if report.at_ns > before => report.at_ns - before,
                _ => elapsed_ns,
            };
            for actor in &report.actors {
                if actor.id.operator == INJECTOR_OPERATOR {
                    continue;
                }
                let counters = &actor.counters;
                let key = (actor.id, report.shard);
                sample.actors.push(interval(
                    interval_ns,
                    actor.id,
                    report.shard,
                    counters,
                    seen.get(&key),
                ));
                let now_seen = Seen {
                    step,
                    cpu_ns: counters.cpu_ns,
                    messages: counters.messages,
                    queue_us: counters.queue_us.clone(),
                };
                seen.insert(key, now_seen);
            }
        }
        // A slot not reported for a while is gone (its actor left or was
        // deactivated); one back sooner goes on from its counters.
        seen.retain(|_, s| s.step + SEEN_STEPS_KEPT > step);
        // An actor reported by two shards (it is moving) counts on the one
        // that did more: it is a model's input, not an account.
        sample
            .actors
            .sort_by(|a, b| a.id.cmp(&b.id).then(b.cpu_ns.cmp(&a.cpu_ns)));
        sample.actors.dedup_by_key(|a| a.id);
        for decision in model.step(&sample) {
            if let Action::Move { actor, to, .. } = decision.action {
                // A shard that died since the sample: the move is moot.
                let _ = runtime.migrate(actor, to);
            }
            if let Some(job) = decision.job() {
                registry.count_scale_action(job);
            }
            if options.log_decisions {
                eprintln!("autoscaler: {decision}");
            }
            let mut kept = decisions.lock().expect("decision log poisoned");
            if kept.len() == DECISIONS_KEPT_MAX {
                kept.pop_front();
            }
            kept.push_back(decision);
        }
    }
}

/// One actor's figures since `before` (its counters at the last step). A
/// counter below its last value (the actor was deactivated or moved and
/// counts afresh) is taken whole; an actor runs on one core, so its CPU time
/// is at most the interval.
fn interval(
    interval_ns: u64,
    id: ActorId,
    shard: ShardId,
    counters: &Counters,
    before: Option<&Seen>,
) -> ActorSample {
    let fresh = before.is_none_or(|b| counters.cpu_ns < b.cpu_ns || counters.messages < b.messages);
    let queue_us = &counters.queue_us;
    let queue_p99_us = match before {
        Some(b) if !fresh && queue_us.len() >= b.queue_us.len() => {
            let mut delta = queue_us.clone();
            match delta.subtract(&b.queue_us) {
                Ok(()) if !delta.is_empty() => delta.value_at_quantile(0.99),
                Ok(()) => 0,
                Err(_) => queue_us.value_at_quantile(0.99),
            }
        }
        _ => queue_us.value_at_quantile(0.99),
    };
    let (cpu_ns, messages) = match before {
        Some(b) if !fresh => (counters.cpu_ns - b.cpu_ns, counters.messages - b.messages),
        _ => (counters.cpu_ns, counters.messages),
    };
    ActorSample {
        id,
        shard,
        interval_ns,
        cpu_ns: cpu_ns.min(interval_ns),
        messages,
        queue_p99_us,
    }
}

//! Message-level scheduling: which runnable actor of a shard runs next.
//!
//! An actor is runnable when its mailbox is non-empty and it is not waiting for
//! credit. It sits in the run queue exactly once, keyed by its *head* message: the
//! key is fixed when the actor enters the queue (the head does not change until the
//! actor runs), so the queue is a plain binary heap with no decrease-key. A mailbox
//! is FIFO, so no policy ever reorders messages of one actor; policies only choose
//! between actors.
//!
//! - `Edf` (default): earliest head deadline first, as in Cameo; a head
//!   already past its deadline when its actor is queued is keyed as if it
//!   had just arrived with its whole budget (`deadline - origin`) ahead: a
//!   job that has fallen behind by more than its SLO (a bulk job in a burst)
//!   cannot make those deadlines by running first, and under plain EDF its
//!   overdue messages would go before every message that still can (the
//!   domino effect of EDF under overload). Deadline 0 marks an urgent
//!   message (a checkpoint barrier): key 0, first.
//! - `Fifo`: earliest head arrival first; the baseline that slot-based engines
//!   behave as.
//! - `FairShare`: start-time fair queueing over jobs: each job's virtual time
//!   advances by the CPU time its turns used divided by its weight, and the actor
//!   whose job is furthest behind runs first.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::actor::SchedCtx;
use crate::ids::{IdMap, JobId};

/// Which policy a shard schedules with.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum PolicyKind {
    #[default]
    Edf,
    Fifo,
    /// Weighted fair share per job; jobs not listed weigh 1.
    FairShare {
        weights: Vec<(JobId, u32)>,
    },
}

impl PolicyKind {
    /// The name `FromStr` takes: `edf`, `fifo` or `fair`.
    pub fn name(&self) -> &'static str {
        match self {
            PolicyKind::Edf => "edf",
            PolicyKind::Fifo => "fifo",
            PolicyKind::FairShare { .. } => "fair",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "edf" => Ok(PolicyKind::Edf),
            "fifo" => Ok(PolicyKind::Fifo),
            "fair" => Ok(PolicyKind::FairShare { weights: vec![] }),
            other => Err(format!(
                "unknown scheduling policy {other:?} (expected edf, fifo or fair)"
            )),
        }
    }
}

/// A scheduling policy: turns the head message of a runnable actor into a key
/// (smaller runs first) and learns what each turn cost.
pub trait Policy {
    /// `arrival`: the head's place in the shard's arrival order; `now_ns`:
    /// the shard's clock as its actor is queued.
    fn key(&mut self, head: &SchedCtx, arrival: u64, now_ns: u64) -> u64;
    fn charge(&mut self, _job: JobId, _cpu_ns: u64) {}
    /// A job is retired: drop what is kept about it.
    fn forget(&mut self, _job: JobId) {}
}

pub struct Edf;
impl Policy for Edf {
    #[inline]
    fn key(&mut self, head: &SchedCtx, _arrival: u64, now_ns: u64) -> u64 {
        // Deadline 0 is urgent (a checkpoint barrier): it runs first.
        if head.deadline_ns >= now_ns || head.deadline_ns == 0 {
            return head.deadline_ns;
        }
        // Overdue: as if it arrived now with its whole budget.
        now_ns.saturating_add(head.deadline_ns.saturating_sub(head.origin_ns))
    }
}

pub struct Fifo;
impl Policy for Fifo {
    #[inline]
    fn key(&mut self, _head: &SchedCtx, arrival: u64, _now_ns: u64) -> u64 {
        arrival
    }
}

/// Start-time fair queueing over jobs.
pub struct FairShare {
    weights: IdMap<JobId, u32>,
    /// Finish tag of each job's last turn, in weighted virtual ns.
    finish: IdMap<JobId, u64>,
    /// System virtual time: the start tag of the turn that ran last.
    virtual_ns: u64,
}

impl FairShare {
    pub fn new(weights: &[(JobId, u32)]) -> Self {
        FairShare {
            weights: weights.iter().map(|&(j, w)| (j, w.max(1))).collect(),
            finish: IdMap::default(),
            virtual_ns: 0,
        }
    }
}

impl Policy for FairShare {
    fn key(&mut self, head: &SchedCtx, _arrival: u64, _now_ns: u64) -> u64 {
        let finish = self.finish.get(&head.job).copied().unwrap_or(0);
        finish.max(self.virtual_ns)
    }

    fn charge(&mut self, job: JobId, cpu_ns: u64) {
        let weight = self.weights.get(&job).copied().unwrap_or(1) as u64;
        let start = self
            .finish
            .get(&job)
            .copied()
            .unwrap_or(0)
            .max(self.virtual_ns);
        self.virtual_ns = start;
        self.finish.insert(job, start + cpu_ns.max(1) / weight);
    }

    fn forget(&mut self, job: JobId) {
        self.finish.remove(&job);
    }
}

pub fn make_policy(kind: &PolicyKind) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Edf => Box::new(Edf),
        PolicyKind::Fifo => Box::new(Fifo),
        PolicyKind::FairShare { weights } => Box::new(FairShare::new(weights)),
    }
}

/// The run queue: `(key, tie-break, slot, generation)`; a stale entry (the actor left
/// the shard) is recognised by its generation and skipped.
#[derive(Default)]
pub struct RunQueue {
    heap: BinaryHeap<Reverse<(u64, u64, u32, u32)>>,
    pushes: u64,
}

impl RunQueue {
    #[inline]
    pub fn push(&mut self, key: u64, slot: u32, generation: u32) {
        self.pushes += 1;
        self.heap
            .push(Reverse((key, self.pushes, slot, generation)));
    }

    #[inline]
    pub fn pop(&mut self) -> Option<(u32, u32)> {
        self.heap
            .pop()
            .map(|Reverse((_, _, slot, generation))| (slot, generation))
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(job: u32, deadline_ns: u64) -> SchedCtx {
        SchedCtx {
            job: JobId(job),
            deadline_ns,
            origin_ns: 0,
        }
    }

    #[test]
    fn policies_order_as_documented() {
        // (deadline, arrival) of three heads: EDF picks by deadline, FIFO by arrival.
        let heads = [(300, 1), (100, 2), (200, 3)];
        let order = |policy: &mut dyn Policy| {
            let mut queue = RunQueue::default();
            for (slot, &(deadline, arrival)) in heads.iter().enumerate() {
                let key = policy.key(&ctx(1, deadline), arrival, 0);
                queue.push(key, slot as u32, 0);
            }
            std::iter::from_fn(|| queue.pop().map(|(s, _)| s)).collect::<Vec<_>>()
        };
        assert_eq!(order(&mut Edf), vec![1, 2, 0]);
        assert_eq!(order(&mut Fifo), vec![0, 1, 2]);
    }

    #[test]
    fn edf_keys_an_overdue_head_as_if_it_arrived_now_with_its_budget() {
        let ms = 1_000_000u64;
        let now = 10_000 * ms;
        // A bulk job (SLO 2 s) 400 ms behind, and a latency-critical one
        // (SLO 10 ms) with 5 ms left: the one that can still make it runs
        // first.
        let bulk = SchedCtx {
            job: JobId(2),
            deadline_ns: now - 400 * ms,
            origin_ns: now - 2_400 * ms,
        };
        let lc = SchedCtx {
            job: JobId(1),
            deadline_ns: now + 5 * ms,
            origin_ns: now - 5 * ms,
        };
        assert!(Edf.key(&lc, 0, now) < Edf.key(&bulk, 0, now));
        assert_eq!(Edf.key(&bulk, 0, now), now + 2_000 * ms);
        // On time, the key is the deadline.
        assert_eq!(Edf.key(&lc, 0, now), now + 5 * ms);
        // An overdue latency-critical head still goes before the bulk job's
        // on-time heads further out.
        let late_lc = SchedCtx {
            deadline_ns: now - ms,
            origin_ns: now - 11 * ms,
            ..lc
        };
        let bulk_on_time = SchedCtx {
            deadline_ns: now + 1_500 * ms,
            origin_ns: now - 500 * ms,
            ..bulk
        };
        assert!(Edf.key(&late_lc, 0, now) < Edf.key(&bulk_on_time, 0, now));
        // An urgent head (deadline 0: a barrier) goes before all of them.
        let barrier = SchedCtx {
            deadline_ns: 0,
            ..bulk
        };
        assert_eq!(Edf.key(&barrier, 0, now), 0);
    }

    #[test]
    fn fair_share_favours_the_job_that_used_less() {
        let mut fair = FairShare::new(&[(JobId(1), 1), (JobId(2), 3)]);
        fair.charge(JobId(1), 3_000);
        fair.charge(JobId(2), 3_000);
        // Job 2 has weight 3: the same CPU time costs it a third of the virtual time.
        assert!(fair.key(&ctx(2, 0), 0, 0) < fair.key(&ctx(1, 0), 0, 0));
        // A retired job's tag is forgotten: the table does not grow per job.
        fair.forget(JobId(1));
        fair.forget(JobId(2));
        assert!(fair.finish.is_empty());
    }

    #[test]
    fn policy_names_parse_and_unknown_is_an_error() {
        assert_eq!("edf".parse::<PolicyKind>(), Ok(PolicyKind::Edf));
        assert_eq!("fifo".parse::<PolicyKind>(), Ok(PolicyKind::Fifo));
        assert!("lifo".parse::<PolicyKind>().unwrap_err().contains("lifo"));
        for name in ["edf", "fifo", "fair"] {
            assert_eq!(name.parse::<PolicyKind>().unwrap().name(), name);
        }
    }
}

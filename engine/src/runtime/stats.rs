//! Accounting, per actor, per job and per shard: queueing delay and service time in
//! HDR histograms, deadline misses, CPU time, stalls and migration pauses. These
//! feed `status` and the autoscaler.
//!
//! Costs: histograms are recorded in microseconds with two significant digits (about
//! 11 KiB each, allocated when the actor activates), the queueing delay once per
//! message (a subtraction and one record) and the service time once per turn (the
//! turn's duration spread over its messages with `record_n`).

use hdrhistogram::Histogram;

use crate::ids::{ActorId, IdMap, JobId, ShardId};

/// Highest value a histogram tracks: 100 s in microseconds; larger values saturate.
pub const HISTOGRAM_US_MAX: u64 = 100_000_000;

pub fn new_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, HISTOGRAM_US_MAX, 2).expect("static histogram bounds are valid")
}

#[inline]
pub fn record_us(histogram: &mut Histogram<u32>, ns: u64, count: u64) {
    let us = (ns / 1_000).clamp(1, HISTOGRAM_US_MAX);
    // Saturating counters never fail; an out-of-range value was clamped above.
    let _ = histogram.record_n(us, count as u32);
}

/// What is measured of one actor (or of one job: the same fields, summed).
#[derive(Clone)]
pub struct Counters {
    pub messages: u64,
    pub turns: u64,
    pub cpu_ns: u64,
    pub deadline_misses: u64,
    pub queue_us: Histogram<u32>,
    pub service_us: Histogram<u32>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            messages: 0,
            turns: 0,
            cpu_ns: 0,
            deadline_misses: 0,
            queue_us: new_histogram(),
            service_us: new_histogram(),
        }
    }
}

impl Counters {
    pub fn merge(&mut self, other: &Counters) {
        self.messages += other.messages;
        self.turns += other.turns;
        self.cpu_ns += other.cpu_ns;
        self.deadline_misses += other.deadline_misses;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.queue_us.add(&other.queue_us);
        let _ = self.service_us.add(&other.service_us);
    }
}

/// One shard's accounting, as reported to `Runtime::stats`.
#[derive(Clone)]
pub struct ShardReport {
    pub shard: ShardId,
    /// The shard's clock when it made the report (ns): what a reader that
    /// compares two reports takes as the time between them.
    pub at_ns: u64,
    pub turns: u64,
    pub messages: u64,
    /// Turns that ran past the stall threshold.
    pub stalls: u64,
    pub parks: u64,
    /// Time the shard's loop had nothing to do (spinning for work, or
    /// parked), cumulative, ns; what is not idle between two reports is
    /// the shard's busy time, the runtime's own work (rings, flushes,
    /// timers, delivery) with its actors' turns. `None` where no loop
    /// measures it (a shard driven by the simulator).
    pub idle_ns: Option<u64>,
    pub migrations_out: u64,
    pub migrations_in: u64,
    /// Migrations to a shard of another node refused because the actor
    /// said it may not be deactivated (its snapshot would not hold all it
    /// needs).
    pub migrations_refused: u64,
    /// Of `migrations_in`, those from another node (by value).
    pub migrations_in_from_nodes: u64,
    /// Messages that reached this shard for an actor living elsewhere.
    pub forwarded: u64,
    /// Remote sends that joined a run of their channel (crossed the ring in a batch).
    pub run_messages: u64,
    pub activations: u64,
    pub deactivations: u64,
    /// Actors removed after a panic (in `handle`, activation, restore or snapshot).
    pub failures: u64,
    /// Messages dropped because their target failed or its job was retired.
    pub dropped: u64,
    /// Packets dropped because their target shard is dead.
    pub dropped_to_dead_shards: u64,
    /// Timers refused because their actor had `timers_per_actor_max` pending.
    pub timers_refused: u64,
    /// Jobs retired on this shard.
    pub jobs_retired: u64,
    /// Pause of each migration that completed here: last message handled at the old
    /// owner to first message handled here.
    pub migration_pause_us: Histogram<u32>,
    /// Of that pause: from the last message handled at the old owner to the handoff
    /// (the actor had nothing to do).
    pub migration_idle_before_us: Histogram<u32>,
    /// Of that pause: from the handoff at the old owner to the install here.
    pub migration_transfer_us: Histogram<u32>,
    pub actors: Vec<ActorReport>,
    pub jobs: Vec<(JobId, Counters)>,
}

#[derive(Clone)]
pub struct ActorReport {
    pub id: ActorId,
    pub mailbox: usize,
    /// Messages that arrived ahead of an earlier one on their channel.
    pub early: usize,
    /// Sends waiting for credit.
    pub blocked: usize,
    pub counters: Counters,
}

/// Per-job counters kept by a shard.
#[derive(Default)]
pub struct JobTable {
    jobs: IdMap<JobId, Counters>,
}

impl JobTable {
    pub fn get(&mut self, job: JobId) -> &mut Counters {
        self.jobs.entry(job).or_default()
    }

    /// Forget a job's counters.
    pub fn remove(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    pub fn report(&self) -> Vec<(JobId, Counters)> {
        let mut jobs: Vec<_> = self.jobs.iter().map(|(j, c)| (*j, c.clone())).collect();
        jobs.sort_by_key(|(j, _)| *j);
        jobs
    }
}

/// The whole runtime's accounting: every shard's report.
pub struct RuntimeStats {
    /// The reports of the live shards, in shard order.
    pub shards: Vec<ShardReport>,
    /// Shards that did not report: dead, or (rarely) not answering in time.
    pub dead: Vec<ShardId>,
}

impl RuntimeStats {
    /// A job's counters summed over shards.
    pub fn job(&self, job: JobId) -> Counters {
        let mut total = Counters::default();
        for shard in &self.shards {
            for (j, counters) in &shard.jobs {
                if *j == job {
                    total.merge(counters);
                }
            }
        }
        total
    }

    pub fn migration_pause_us(&self) -> Histogram<u32> {
        let mut total = new_histogram();
        for shard in &self.shards {
            let _ = total.add(&shard.migration_pause_us);
        }
        total
    }

    /// Sum of one per-shard histogram over the shards.
    pub fn merged(&self, pick: impl Fn(&ShardReport) -> &Histogram<u32>) -> Histogram<u32> {
        let mut total = new_histogram();
        for shard in &self.shards {
            let _ = total.add(pick(shard));
        }
        total
    }

    pub fn stalls(&self) -> u64 {
        self.shards.iter().map(|s| s.stalls).sum()
    }

    /// Actors deactivated (idle, their state to the store), on any shard.
    pub fn deactivations(&self) -> u64 {
        self.shards.iter().map(|s| s.deactivations).sum()
    }
}

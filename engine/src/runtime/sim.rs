//! A deterministic simulation of several shards in one thread.
//!
//! The cores are the real `ShardCore`s; only the executor loop is replaced. A seeded
//! generator decides at every step which core runs a turn, which ring moves how
//! many packets, and when the clock advances, so every interleaving the rings allow
//! can be reached, and a failing seed replays exactly. Rings are bounded like the
//! real ones: a full ring leaves packets in the sender's staging.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use crate::actor::{ActorFactory, Outgoing, SchedCtx};
use crate::clock::Clock;
use crate::ids::{mix64, ActorId, ShardId};

use super::shard::{External, Packet, ShardConfig, ShardCore};
use super::store::StateStore;

/// Seeded splitmix64: small, fast and reproducible.
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

pub struct Sim<M: Send + 'static> {
    cores: Vec<ShardCore<M>>,
    /// In-flight packets, `rings[source][target]`.
    rings: Vec<Vec<VecDeque<Packet<M>>>>,
    ring_packets: usize,
    clock: Rc<Cell<u64>>,
    rng: SimRng,
    /// Per shard: a random turn on it happens only one time in this many.
    turn_one_in: Vec<u64>,
}

impl<M: Send + 'static> Sim<M> {
    pub fn new(
        shards: u16,
        config: ShardConfig,
        ring_packets: usize,
        factory: Arc<dyn ActorFactory<M>>,
        store: Arc<dyn StateStore>,
        seed: u64,
    ) -> Self {
        let (clock, time) = Clock::manual(1_000_000);
        let cores = (0..shards)
            .map(|i| {
                ShardCore::new(
                    ShardId(i),
                    shards,
                    config.clone(),
                    clock.clone(),
                    factory.clone(),
                    store.clone(),
                )
            })
            .collect();
        let rings = (0..shards)
            .map(|_| (0..shards).map(|_| VecDeque::new()).collect())
            .collect();
        Sim {
            cores,
            rings,
            ring_packets: ring_packets.max(1),
            clock: time,
            rng: SimRng::new(seed),
            turn_one_in: vec![1; shards as usize],
        }
    }

    pub fn core(&mut self, shard: ShardId) -> &mut ShardCore<M> {
        &mut self.cores[shard.index()]
    }

    pub fn send(&mut self, via: ShardId, to: ActorId, message: M, sched: SchedCtx) {
        let core = &mut self.cores[via.index()];
        core.tick();
        core.external(External::Send(Outgoing {
            to,
            sched,
            message,
            due_ns: 0,
            uncredited: false,
        }));
    }

    pub fn migrate(&mut self, via: ShardId, actor: ActorId, to: ShardId) {
        let core = &mut self.cores[via.index()];
        core.tick();
        core.external(External::Migrate { actor, to });
    }

    /// Make `shard` slow: a random step runs a turn on it only one time in `one_in`.
    pub fn slow_down(&mut self, shard: ShardId, one_in: u64) {
        self.turn_one_in[shard.index()] = one_in.max(1);
    }

    /// The simulated clock.
    pub fn now_ns(&self) -> u64 {
        self.clock.get()
    }

    pub fn advance_ns(&mut self, ns: u64) {
        self.clock.set(self.clock.get() + ns);
    }

    /// One random step; false when nothing at all could happen.
    pub fn step(&mut self) -> bool {
        let shards = self.cores.len();
        let ns = self.rng.below(2_000);
        self.advance_ns(ns);
        // Try a few random actions before declaring the system quiet.
        for _ in 0..4 {
            let core = self.rng.below(shards as u64) as usize;
            let other = self.rng.below(shards as u64) as usize;
            let progressed = match self.rng.below(3) {
                0 => {
                    if self.rng.below(self.turn_one_in[core]) != 0 {
                        continue;
                    }
                    self.cores[core].tick();
                    self.cores[core].fire_timers() > 0 || self.cores[core].run_turn()
                }
                1 => self.flush(core, other),
                _ => self.receive(core, other),
            };
            if progressed {
                return true;
            }
        }
        self.any_step()
    }

    /// Deterministic sweep: do the first thing that can be done.
    fn any_step(&mut self) -> bool {
        let shards = self.cores.len();
        for core in 0..shards {
            for other in 0..shards {
                if self.receive(core, other) || self.flush(core, other) {
                    return true;
                }
            }
            self.cores[core].tick();
            if self.cores[core].fire_timers() > 0 || self.cores[core].run_turn() {
                return true;
            }
        }
        // Quiet but for timers: jump the clock to the earliest one.
        let next = self.cores.iter().filter_map(|c| c.next_timer_ns()).min();
        if let Some(due_ns) = next {
            self.clock.set(self.clock.get().max(due_ns));
            return true;
        }
        false
    }

    fn flush(&mut self, source: usize, target: usize) -> bool {
        if source == target {
            return false;
        }
        let room = self.ring_packets - self.rings[source][target].len();
        let staged = self.cores[source].staging(ShardId(target as u16));
        let moved = staged.len().min(room).min(1 + self.rng.0 as usize % 8);
        for _ in 0..moved {
            let packet = staged.pop_front().expect("counted");
            self.rings[source][target].push_back(packet);
        }
        moved > 0
    }

    fn receive(&mut self, target: usize, source: usize) -> bool {
        let take = (1 + self.rng.below(8) as usize).min(self.rings[source][target].len());
        if take == 0 {
            return false;
        }
        self.cores[target].tick();
        for _ in 0..take {
            let packet = self.rings[source][target].pop_front().expect("counted");
            self.cores[target].receive(packet);
        }
        true
    }

    /// Step until nothing can happen; returns the steps taken. Panics past `steps_max`.
    pub fn run_until_quiet(&mut self, steps_max: u64) -> u64 {
        let mut steps = 0;
        while self.step() {
            steps += 1;
            assert!(
                steps <= steps_max,
                "simulation still busy after {steps_max} steps"
            );
        }
        steps
    }

    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.rng
    }
}

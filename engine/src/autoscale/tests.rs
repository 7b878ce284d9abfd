//! The model on synthetic load traces, deterministically: a simulated world
//! of shards with one core each, actors with a CPU demand, the figures a
//! runtime would report for them, and the model's moves applied back.

use super::*;

const STEP_NS: u64 = 50_000_000;
const LC: JobId = JobId(1);
const BULK: JobId = JobId(2);

/// Actors with a demand (cores they would use given a core), placed on shards.
struct World {
    shards: usize,
    dead: Vec<ShardId>,
    /// (actor, shard, demand)
    actors: Vec<(ActorId, usize, f64)>,
    jobs: BTreeMap<JobId, JobSample>,
    /// The share of a producer's demand its fused steps are, which relays
    /// take over when they are split out.
    steps_share: f64,
}

fn actor(job: JobId, operator: u32, partition: u32) -> ActorId {
    ActorId {
        job,
        operator,
        partition,
    }
}

impl World {
    fn new(shards: usize) -> World {
        let mut jobs = BTreeMap::new();
        jobs.insert(
            LC,
            JobSample {
                slo_ns: 10_000_000,
                scalable: true,
                records_in: 0,
                ended: false,
                splittable: 0,
                parallelizable: 0,
                unchainable: 0,
                relays: 0,
                crossable: 0,
            },
        );
        jobs.insert(
            BULK,
            JobSample {
                slo_ns: 2_000_000_000,
                scalable: true,
                records_in: 0,
                ended: false,
                splittable: 0,
                parallelizable: 0,
                unchainable: 0,
                relays: 0,
                crossable: 0,
            },
        );
        World {
            shards,
            dead: Vec::new(),
            actors: Vec::new(),
            jobs,
            steps_share: 0.75,
        }
    }

    fn add(&mut self, id: ActorId, shard: usize, demand: f64) {
        self.actors.push((id, shard, demand));
    }

    fn demand_on(&self, shard: usize) -> f64 {
        self.actors
            .iter()
            .filter(|a| a.1 == shard)
            .map(|a| a.2)
            .sum()
    }

    /// What a runtime would report over one step: an overloaded shard gives
    /// each actor its share of the core, and its queues grow.
    fn sample(&self) -> Sample {
        let actors = self
            .actors
            .iter()
            .map(|&(id, shard, demand)| {
                let total = self.demand_on(shard);
                let share = if total > 1.0 { demand / total } else { demand };
                let queue_p99_us = if total > 1.0 {
                    (50_000.0 * (total - 1.0)) as u64 + 200
                } else {
                    (200.0 * total) as u64
                };
                ActorSample {
                    id,
                    shard: ShardId(shard as u16),
                    interval_ns: STEP_NS,
                    cpu_ns: (share * STEP_NS as f64) as u64,
                    messages: (demand * 10_000.0) as u64,
                    queue_p99_us,
                }
            })
            .collect();
        Sample {
            shards: self.shards,
            dead: self.dead.clone(),
            actors,
            jobs: self.jobs.clone(),
            remote: Vec::new(),
        }
    }

    fn apply(&mut self, decisions: &[Decision]) {
        for decision in decisions {
            match decision.action {
                Action::Move {
                    actor, from, to, ..
                } => {
                    let entry = self.actors.iter_mut().find(|a| a.0 == actor).unwrap();
                    assert_eq!(entry.1, from.index(), "{decision}");
                    entry.1 = to.index();
                }
                // Half the key groups carry half the demand here; a merge
                // gives half of what the partition that took them has back.
                Action::Split { actor, into } => {
                    let half = self.demand(actor) / 2.0;
                    self.shift(actor, into, half);
                }
                Action::Merge { into, from } => {
                    let half = self.demand(from) / 2.0;
                    self.shift(from, into, half);
                }
                // Parallel mode: the stage's demand evens out over its
                // partitions; back by key, partition 0 takes it all again
                // (every key of these worlds is in its range).
                Action::Parallel { job, stage } => {
                    let ids: Vec<ActorId> = self.stage_actors(job, stage);
                    let total: f64 = ids.iter().map(|&id| self.demand(id)).sum();
                    for a in &mut self.actors {
                        if ids.contains(&a.0) {
                            a.2 = total / ids.len() as f64;
                        }
                    }
                }
                Action::Ordered { job, stage } => {
                    let ids: Vec<ActorId> = self.stage_actors(job, stage);
                    let total: f64 = ids.iter().map(|&id| self.demand(id)).sum();
                    for a in &mut self.actors {
                        if ids.contains(&a.0) {
                            a.2 = if a.0.partition == 0 { total } else { 0.0 };
                        }
                    }
                }
                // Steps out onto relays: the producer keeps what is not its
                // steps' (its own work), the rest evens out over the job's
                // relay partitions; fused back, it takes it all again.
                Action::Unchain { job, stage } => {
                    let relays = self.jobs[&job].relays;
                    let moved: f64 = self
                        .actors
                        .iter_mut()
                        .filter(|a| a.0.job == job && a.0.operator == stage)
                        .map(|a| {
                            let moved = a.2 * self.steps_share;
                            a.2 -= moved;
                            moved
                        })
                        .sum();
                    let ids: Vec<ActorId> = self
                        .actors
                        .iter()
                        .map(|a| a.0)
                        .filter(|id| id.job == job && relays & (1 << id.operator) != 0)
                        .collect();
                    for a in &mut self.actors {
                        if ids.contains(&a.0) {
                            a.2 += moved / ids.len() as f64;
                        }
                    }
                }
                Action::Rechain { job, stage } => {
                    let relays = self.jobs[&job].relays;
                    let mut back = 0.0;
                    for a in &mut self.actors {
                        if a.0.job == job && relays & (1 << a.0.operator) != 0 {
                            back += std::mem::take(&mut a.2);
                        }
                    }
                    let producer = self.stage_actors(job, stage)[0];
                    for a in &mut self.actors {
                        if a.0 == producer {
                            a.2 += back;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn stage_actors(&self, job: JobId, stage: u32) -> Vec<ActorId> {
        self.actors
            .iter()
            .map(|a| a.0)
            .filter(|id| id.job == job && id.operator == stage)
            .collect()
    }

    fn demand(&self, id: ActorId) -> f64 {
        self.actors.iter().find(|a| a.0 == id).unwrap().2
    }

    /// `amount` of demand from one actor to another.
    fn shift(&mut self, from: ActorId, to: ActorId, amount: f64) {
        for a in &mut self.actors {
            if a.0 == from {
                a.2 -= amount;
            } else if a.0 == to {
                a.2 += amount;
            }
        }
    }

    fn max_load(&self) -> f64 {
        (0..self.shards)
            .map(|s| self.demand_on(s))
            .fold(0.0, f64::max)
    }

    fn set_demand(&mut self, job: JobId, demand: f64) {
        for a in &mut self.actors {
            if a.0.job == job {
                a.2 = demand;
            }
        }
    }
}

fn moves(decisions: &[Decision]) -> usize {
    decisions
        .iter()
        .filter(|d| matches!(d.action, Action::Move { .. }))
        .count()
}

/// `lc` and `bulk` actors of 0.045 cores each, round robin over `shards`.
fn two_jobs(shards: usize, per_job: u32) -> World {
    let mut world = World::new(shards);
    for p in 0..per_job {
        world.add(actor(LC, 1, p), p as usize % shards, 0.045);
        world.add(actor(BULK, 1, p), p as usize % shards, 0.045);
    }
    world
}

/// Deterministic noise in [-1, 1).
fn noise(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

#[test]
fn it_converges_within_two_steps_after_a_load_step_on_any_shard_count() {
    for shards in [2, 4, 8, 16] {
        let mut world = two_jobs(shards, 4 * shards as u32);
        let mut scaler = Autoscaler::new(AutoscaleConfig::default());
        for _ in 0..5 {
            assert!(scaler.step(&world.sample()).is_empty(), "quiet before");
        }
        // A 5x step of the bulk job, but only of its actors on the first
        // half of the shards (skew): those shards want 1.08 cores.
        for a in &mut world.actors {
            if a.0.job == BULK && a.1 < shards / 2 {
                a.2 *= 5.0;
            }
        }
        assert!(
            world.max_load() > 1.0,
            "{shards} shards: the step overloads"
        );
        let mut steps = 0;
        while world.max_load() > scaler.config().high_load {
            steps += 1;
            assert!(steps <= 2, "{shards} shards: not converged in 2 steps");
            let decisions = scaler.step(&world.sample());
            assert!(moves(&decisions) > 0, "{shards} shards: {decisions:?}");
            world.apply(&decisions);
        }
        // Then still: nothing moves under the steady load.
        for _ in 0..50 {
            let decisions = scaler.step(&world.sample());
            assert!(decisions.is_empty(), "{shards} shards: {decisions:?}");
        }
    }
}

#[test]
fn it_does_not_oscillate_under_steady_or_noisy_load() {
    for (shards, per_shard) in [(2, 0.6), (8, 0.6), (8, 0.8)] {
        let mut world = two_jobs(shards, 4 * shards as u32);
        // Each shard near `per_shard`, balanced.
        let demand = per_shard / 8.0;
        world.set_demand(LC, demand);
        world.set_demand(BULK, demand);
        let mut scaler = Autoscaler::new(AutoscaleConfig::default());
        let mut rng = 7u64;
        let mut total = 0;
        for step in 0..400 {
            // Every actor's demand varies by up to ±10% around its mean.
            for a in &mut world.actors {
                a.2 = demand * (1.0 + 0.1 * noise(&mut rng));
            }
            let decisions = scaler.step(&world.sample());
            total += moves(&decisions);
            world.apply(&decisions);
            assert!(
                step < 10 || moves(&decisions) == 0,
                "{shards} shards at {per_shard}: moves at step {step}: {decisions:?}"
            );
        }
        assert_eq!(
            total, 0,
            "{shards} shards at {per_shard}: balanced load needs no move"
        );
    }
}

#[test]
fn an_actor_moved_back_and_forth_never_happens() {
    // Two shards, loads that alternate which side is hot every step: the
    // cooldown keeps each actor where a move put it.
    let mut world = World::new(2);
    for p in 0..4 {
        world.add(actor(BULK, 1, p), 0, 0.3);
    }
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut moved: BTreeMap<ActorId, u64> = BTreeMap::new();
    for step in 0..60u64 {
        // The demand swings between the partitions every step.
        for a in &mut world.actors {
            let even = a.0.partition % 2 == 0;
            a.2 = if even == (step % 2 == 0) { 0.45 } else { 0.15 };
        }
        let decisions = scaler.step(&world.sample());
        for d in &decisions {
            if let Action::Move { actor, .. } = d.action {
                if let Some(last) = moved.insert(actor, step) {
                    assert!(
                        step - last >= scaler.config().cooldown_steps,
                        "{actor} moved at {last} and {step}"
                    );
                }
            }
        }
        world.apply(&decisions);
    }
}

#[test]
fn the_job_with_the_most_slack_moves_first() {
    let mut world = World::new(2);
    world.add(actor(LC, 1, 0), 0, 0.3);
    world.add(actor(BULK, 1, 0), 0, 0.3);
    world.add(actor(BULK, 1, 1), 0, 0.3);
    world.add(actor(LC, 1, 1), 1, 0.1);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let decisions = scaler.step(&world.sample());
    assert_eq!(moves(&decisions), 1, "{decisions:?}");
    let Action::Move {
        actor, from, to, ..
    } = decisions[0].action
    else {
        unreachable!()
    };
    assert_eq!((actor.job, from, to), (BULK, ShardId(0), ShardId(1)));
    assert!(
        decisions[0].reason.contains("load 0.90"),
        "{}",
        decisions[0]
    );
    world.apply(&decisions);
    assert!(world.max_load() <= 0.85);
}

#[test]
fn a_late_actor_makes_a_shard_under_the_high_mark_overloaded() {
    let mut world = World::new(2);
    world.add(actor(LC, 1, 0), 0, 0.4);
    world.add(actor(BULK, 1, 0), 0, 0.4);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    // Load 0.8: under the high mark, and no queue: nothing to do.
    assert!(scaler.step(&world.sample()).is_empty());
    // The same load with the LC job's queueing delay over half its SLO.
    let mut sample = world.sample();
    sample.actors[0].queue_p99_us = 6_000;
    let decisions = scaler.step(&sample);
    assert_eq!(moves(&decisions), 1, "{decisions:?}");
    assert!(decisions[0].reason.contains("late"), "{}", decisions[0]);
}

#[test]
fn dead_shards_and_fixed_jobs_are_left_alone() {
    let mut world = World::new(3);
    world.dead.push(ShardId(1));
    world.jobs.get_mut(&LC).unwrap().scalable = false;
    world.add(actor(LC, 1, 0), 0, 0.5);
    world.add(actor(LC, 1, 1), 0, 0.5);
    world.add(actor(BULK, 1, 0), 0, 0.3);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let decisions = scaler.step(&world.sample());
    assert_eq!(moves(&decisions), 1, "{decisions:?}");
    let Action::Move { actor, to, .. } = decisions[0].action else {
        unreachable!()
    };
    assert_eq!(
        (actor.job, to),
        (BULK, ShardId(2)),
        "only the bulk job, never to the dead shard"
    );
}

#[test]
fn an_actor_too_big_to_move_is_told_as_needing_parallelism_once_per_cooldown() {
    let mut world = World::new(2);
    // One stage, one activation, wanting 1.6 cores: no move helps.
    world.add(actor(BULK, 2, 0), 0, 1.6);
    world.add(actor(LC, 1, 0), 1, 0.1);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut told = Vec::new();
    for step in 1..=13u64 {
        for d in scaler.step(&world.sample()) {
            assert!(!matches!(d.action, Action::Move { .. }), "{d}");
            told.push(step);
            // Measured on the shard: a full core, so 1.0 / 0.7 -> 2.
            assert_eq!(
                d.action,
                Action::NeedsParallelism {
                    shard: ShardId(0),
                    operators: vec![(BULK, 2, 1, 2)],
                },
                "{d}"
            );
        }
    }
    let every = scaler.config().cooldown_steps;
    assert_eq!(told, [1, 1 + every, 1 + 2 * every]);
}

#[test]
fn needed_activations_is_one_step_of_busy_over_target() {
    assert_eq!(needed_activations(0.0, 0.7), 1);
    assert_eq!(needed_activations(0.7, 0.7), 1);
    assert_eq!(needed_activations(0.71, 0.7), 2);
    assert_eq!(needed_activations(2.8, 0.7), 4);
}

#[test]
fn one_shard_or_an_empty_interval_decides_nothing() {
    let mut world = World::new(1);
    world.add(actor(BULK, 1, 0), 0, 3.0);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    assert!(scaler.step(&world.sample()).is_empty());
    // An interval of no length measures nothing.
    let mut sample = two_jobs(2, 4).sample();
    for a in &mut sample.actors {
        a.interval_ns = 0;
    }
    assert!(scaler.step(&sample).is_empty());
}

#[test]
fn a_shard_that_dips_for_one_step_is_not_room() {
    let mut world = World::new(2);
    world.add(actor(BULK, 1, 0), 0, 0.5);
    world.add(actor(BULK, 1, 1), 0, 0.5);
    world.add(actor(BULK, 2, 0), 1, 0.95);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    // Both shards busy: nothing to gain.
    assert_eq!(moves(&scaler.step(&world.sample())), 0);
    // Shard 1 dips for one step (it waited on a full mailbox, say): no move.
    world.actors[2].2 = 0.2;
    assert_eq!(
        moves(&scaler.step(&world.sample())),
        0,
        "one dip is not room"
    );
    // It stays low: now it is room.
    let decisions = scaler.step(&world.sample());
    assert_eq!(moves(&decisions), 1, "{decisions:?}");
}

#[test]
fn the_tightest_job_on_a_shared_shard_stays_unless_it_is_late() {
    let world = {
        let mut world = World::new(2);
        world.add(actor(BULK, 1, 0), 0, 0.6);
        world.add(actor(LC, 1, 0), 0, 0.35);
        world.add(actor(BULK, 2, 0), 1, 0.5);
        world
    };
    // Only the LC actor would fit on shard 1, and it is not late: it stays.
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut sample = world.sample();
    for a in &mut sample.actors {
        a.queue_p99_us = 100;
    }
    let decisions = scaler.step(&sample);
    assert!(decisions.is_empty(), "{decisions:?}");
    // Its queueing takes more than half its SLO: it moves.
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    sample.actors[1].queue_p99_us = 6_000;
    let decisions = scaler.step(&sample);
    assert_eq!(moves(&decisions), 1, "{decisions:?}");
    assert!(matches!(decisions[0].action, Action::Move { actor, .. } if actor.job == LC));
}

fn moves_of(decisions: &[Decision], want: Scale) -> usize {
    decisions
        .iter()
        .filter(|d| d.action.scale() == Some(want))
        .count()
}

fn shards_in_use(world: &World) -> usize {
    (0..world.shards)
        .filter(|&s| world.actors.iter().any(|a| a.1 == s))
        .count()
}

#[test]
fn cold_shards_are_drained_lazily_into_as_few_as_the_load_needs() {
    for shards in [2, 4, 8] {
        // Two actors of 0.04 cores per shard: every shard cold.
        let mut world = World::new(shards);
        for p in 0..2 * shards as u32 {
            world.add(actor(BULK, 1, p), p as usize % shards, 0.04);
        }
        let total = 0.08 * shards as f64;
        let mut scaler = Autoscaler::new(AutoscaleConfig::default());
        let lazy = scaler.config().scale_in_steps;
        let mut first_drain = None;
        let mut moved: BTreeMap<ActorId, Vec<Scale>> = BTreeMap::new();
        for step in 1..=400u64 {
            let decisions = scaler.step(&world.sample());
            assert_eq!(moves_of(&decisions, Scale::Out), 0, "{decisions:?}");
            if moves_of(&decisions, Scale::In) > 0 && first_drain.is_none() {
                first_drain = Some(step);
            }
            for d in &decisions {
                if let Action::Move { actor, scale, .. } = d.action {
                    moved.entry(actor).or_default().push(scale);
                }
            }
            world.apply(&decisions);
            // No shard is ever packed past the packed load.
            assert!(world.max_load() <= scaler.config().packed_load + 1e-9);
        }
        // Not before the shard was cold for `scale_in_steps` steps.
        assert_eq!(first_drain, Some(lazy), "{shards} shards");
        // As few shards as the packed load allows, and then still.
        let needed = (total / scaler.config().packed_load).ceil() as usize;
        assert_eq!(shards_in_use(&world), needed.max(1), "{shards} shards");
        for _ in 0..100 {
            assert!(scaler.step(&world.sample()).is_empty());
        }
        // An actor is drained at most once per shard it leaves, never back.
        assert!(moved.values().all(|m| m.len() < shards), "{moved:?}");
    }
}

#[test]
fn a_drain_that_would_pack_a_shard_past_its_mark_or_move_a_fixed_or_late_actor_waits() {
    // Shard 0 cold (0.2), shard 1 at 0.45: 0.65 is past the packed load.
    let mut world = World::new(2);
    world.add(actor(BULK, 1, 0), 0, 0.2);
    world.add(actor(BULK, 1, 1), 1, 0.45);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    for _ in 0..100 {
        assert!(scaler.step(&world.sample()).is_empty());
    }
    // Both cold, but the actor of the emptier one belongs to a fixed job.
    let mut world = World::new(2);
    world.jobs.get_mut(&LC).unwrap().scalable = false;
    world.add(actor(LC, 1, 0), 0, 0.05);
    world.add(actor(BULK, 1, 0), 1, 0.1);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut drained = Vec::new();
    for _ in 0..100 {
        let decisions = scaler.step(&world.sample());
        drained.extend(decisions.iter().map(|d| d.action.clone()));
        world.apply(&decisions);
    }
    // The scalable job's shard is drained into the fixed job's instead.
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert!(matches!(
        drained[0],
        Action::Move { actor, from: ShardId(1), to: ShardId(0), scale: Scale::In }
            if actor.job == BULK
    ));
}

#[test]
fn after_a_drain_a_load_step_scales_out_again_and_it_settles() {
    let mut world = World::new(4);
    for p in 0..8 {
        world.add(actor(BULK, 1, p), p as usize % 4, 0.03);
    }
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    for _ in 0..200 {
        let decisions = scaler.step(&world.sample());
        world.apply(&decisions);
    }
    assert_eq!(shards_in_use(&world), 1, "0.24 cores fit on one shard");
    // A 4x step: 0.96 cores on one shard.
    world.set_demand(BULK, 0.12);
    let mut steps = 0;
    while world.max_load() > scaler.config().high_load {
        steps += 1;
        assert!(steps <= 2, "not converged in 2 steps");
        let decisions = scaler.step(&world.sample());
        assert!(moves_of(&decisions, Scale::Out) > 0, "{decisions:?}");
        world.apply(&decisions);
    }
    // Then nothing moves either way while the load holds.
    for _ in 0..200 {
        let decisions = scaler.step(&world.sample());
        assert!(decisions.is_empty(), "{decisions:?}");
    }
}

#[test]
fn a_saturated_shard_beside_an_idle_one_gives_half_of_each_stage_in_one_step() {
    // A job started small: three stages of four actors on shard 0, wanting
    // 1.6 cores; the runtime reports each its share of the one core.
    let mut world = World::new(2);
    for stage in 0..3 {
        for p in 0..4 {
            let demand = if stage == 0 { 0.25 } else { 0.075 };
            world.add(actor(BULK, stage, p), 0, demand);
        }
    }
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let decisions = scaler.step(&world.sample());
    assert_eq!(moves_of(&decisions, Scale::Out), 6, "{decisions:#?}");
    world.apply(&decisions);
    for stage in 0..3 {
        let moved = world
            .actors
            .iter()
            .filter(|a| a.0.operator == stage && a.1 == 1)
            .count();
        assert_eq!(moved, 2, "stage {stage}: half moved");
    }
    // 0.8 cores each: nothing more moves either way.
    for _ in 0..100 {
        let decisions = scaler.step(&world.sample());
        assert!(decisions.is_empty(), "{decisions:#?}");
    }
}

#[test]
fn a_late_job_on_a_shard_with_room_is_spread_and_not_packed_back_soon() {
    let mut world = World::new(2);
    world.add(actor(LC, 1, 0), 0, 0.22);
    world.add(actor(LC, 1, 1), 0, 0.22);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    // Load 0.44, under the target, but its queues ate more than half the SLO.
    let mut sample = world.sample();
    sample.actors[0].queue_p99_us = 6_000;
    let decisions = scaler.step(&sample);
    assert_eq!(moves_of(&decisions, Scale::Out), 1, "{decisions:?}");
    world.apply(&decisions);
    // Both shards are now cold (0.22), but a drain would pack the late job
    // back: not for `repack_steps`.
    let repack = scaler.config().repack_steps;
    for step in 2..=repack {
        let decisions = scaler.step(&world.sample());
        assert!(decisions.is_empty(), "step {step}: {decisions:?}");
    }
    // Then, still cold and on time, it is packed onto one shard.
    let mut drained = 0;
    for _ in 0..50 {
        let decisions = scaler.step(&world.sample());
        drained += moves_of(&decisions, Scale::In);
        world.apply(&decisions);
    }
    assert_eq!(drained, 1);
    assert_eq!(shards_in_use(&world), 1);
}

/// The scale-to-zero decisions and wakes of `decisions`, as `(job, zero)`.
fn zero_and_wake(decisions: &[Decision]) -> Vec<(JobId, bool)> {
    decisions
        .iter()
        .filter_map(|d| match d.action {
            Action::ScaleToZero { job } => Some((job, true)),
            Action::Wake { job } => Some((job, false)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_idle_job_is_scaled_to_zero_once_and_its_wake_is_recorded() {
    let mut world = two_jobs(4, 8);
    let mut model = Autoscaler::new(AutoscaleConfig::default());
    let zero_steps = model.config().zero_steps;
    // Step the model, both jobs taking records unless idle; returns its
    // scale-to-zero decisions and wakes.
    let step = |world: &mut World, model: &mut Autoscaler, idle: &[JobId]| {
        for (job, sample) in world.jobs.iter_mut() {
            if !idle.contains(job) {
                sample.records_in += 1_000;
            }
        }
        for &job in idle {
            world.set_demand(job, 0.0);
        }
        let decisions = model.step(&world.sample());
        world.apply(&decisions);
        zero_and_wake(&decisions)
    };
    for _ in 0..20 {
        assert!(step(&mut world, &mut model, &[]).is_empty());
    }
    // BULK stops: scaled to zero at its `zero_steps`-th idle step, once.
    let mut seen = Vec::new();
    for idle_step in 1..=3 * zero_steps {
        for decision in step(&mut world, &mut model, &[BULK]) {
            seen.push((idle_step, decision));
        }
    }
    assert_eq!(seen, vec![(zero_steps, (BULK, true))]);
    // Records again: one wake, at once; then idle again, zero again.
    world.set_demand(BULK, 0.045);
    assert_eq!(step(&mut world, &mut model, &[]), vec![(BULK, false)]);
    let again: Vec<_> = (0..2 * zero_steps)
        .flat_map(|_| step(&mut world, &mut model, &[BULK]))
        .collect();
    assert_eq!(again, vec![(BULK, true)]);
    // With no record into any job the engine takes idle steps (no actor
    // figures): they count the same, and a job already at zero stays there.
    let idle: Vec<_> = (0..2 * zero_steps)
        .flat_map(|_| zero_and_wake(&model.idle_step(&world.jobs)))
        .collect();
    assert_eq!(idle, vec![(LC, true)]);
    // Every such decision says why, with its figures.
    let decision = Decision {
        step: 1,
        action: Action::ScaleToZero { job: LC },
        reason: "no record in for 10 steps, after 5 records".into(),
    };
    assert!(decision
        .to_string()
        .contains("scale to zero: job 1: no record in for 10 steps"));
    assert_eq!(decision.action.scale(), Some(Scale::In));
    assert_eq!(
        Action::Wake { job: LC }.scale(),
        None,
        "a wake is the runtime's"
    );
}

#[test]
fn a_trickle_a_fixed_job_an_ended_job_and_one_never_fed_stay_up() {
    let mut model = Autoscaler::new(AutoscaleConfig::default());
    let zero_steps = model.config().zero_steps;
    let job = |scalable, records_in, ended| JobSample {
        slo_ns: 10_000_000,
        scalable,
        records_in,
        ended,
        splittable: 0,
        parallelizable: 0,
        unchainable: 0,
        relays: 0,
        crossable: 0,
    };
    let (trickle, fixed, ended, never) = (JobId(1), JobId(2), JobId(3), JobId(4));
    let mut jobs = BTreeMap::new();
    let mut decisions = Vec::new();
    for step in 0..20 * zero_steps {
        // One record every `zero_steps - 1` steps: never `zero_steps` idle.
        let trickled = step / (zero_steps - 1);
        jobs.insert(trickle, job(true, 1 + trickled, false));
        jobs.insert(fixed, job(false, 100, false));
        jobs.insert(ended, job(true, 100, true));
        jobs.insert(never, job(true, 0, false));
        decisions.extend(model.idle_step(&jobs));
    }
    assert!(decisions.is_empty(), "{decisions:#?}");
}

fn splits_and_merges(decisions: &[Decision]) -> (usize, usize) {
    let count = |want: fn(&Action) -> bool| decisions.iter().filter(|d| want(&d.action)).count();
    (
        count(|a| matches!(a, Action::Split { .. })),
        count(|a| matches!(a, Action::Merge { .. })),
    )
}

/// A world of `shards` with one keyed stage of BULK (stage 2, splittable)
/// whose partition 0 on shard 0 wants `hot` cores, its other partitions
/// light where `siblings` says, and an LC actor on the last shard.
fn hot_partition(shards: usize, hot: f64, siblings: &[usize]) -> World {
    let mut world = World::new(shards);
    world.jobs.get_mut(&BULK).unwrap().splittable = 1 << 2;
    world.add(actor(BULK, 2, 0), 0, hot);
    for (p, &shard) in siblings.iter().enumerate() {
        world.add(actor(BULK, 2, p as u32 + 1), shard, 0.02);
    }
    world.add(actor(LC, 1, 0), shards - 1, 0.1);
    world
}

#[test]
fn an_actor_too_busy_to_move_splits_its_key_groups_into_a_partition_with_room() {
    for shards in [2, 4, 8] {
        // A partition wanting 1.2 cores, its sibling on the last shard.
        let mut world = hot_partition(shards, 1.2, &[shards - 1]);
        let mut scaler = Autoscaler::new(AutoscaleConfig::default());
        let mut log = Vec::new();
        for step in 1..=40u64 {
            let decisions = scaler.step(&world.sample());
            world.apply(&decisions);
            if step == 1 {
                assert!(
                    decisions.iter().any(|d| d.action
                        == Action::Split {
                            actor: actor(BULK, 2, 0),
                            into: actor(BULK, 2, 1),
                        }),
                    "{shards} shards: split at the first step: {decisions:?}"
                );
            }
            log.extend(decisions.into_iter().map(|d| (step, d)));
        }
        // Converged: every shard under the high mark, after 2 steps at most.
        assert!(
            world.max_load() <= 0.85,
            "{shards} shards: {}",
            world.max_load()
        );
        let last = log.iter().map(|(step, _)| *step).max().unwrap();
        assert!(
            last <= 2,
            "{shards} shards: still acting at step {last}: {log:?}"
        );
        let decisions: Vec<Decision> = log.into_iter().map(|(_, d)| d).collect();
        assert_eq!(splits_and_merges(&decisions), (1, 0), "{shards} shards");
    }
}

#[test]
fn a_hot_actor_whose_siblings_share_its_shard_moves_one_out_and_splits_into_it() {
    // Both partitions on shard 0; shard 1 has room.
    let mut world = hot_partition(2, 1.2, &[0]);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut first_two = Vec::new();
    for _ in 0..2 {
        let decisions = scaler.step(&world.sample());
        world.apply(&decisions);
        first_two.extend(decisions);
    }
    assert!(
        first_two
            .iter()
            .any(|d| matches!(d.action, Action::Move { actor: moved, to, .. }
            if moved == actor(BULK, 2, 1) && to == ShardId(1))),
        "{first_two:?}"
    );
    assert_eq!(splits_and_merges(&first_two), (1, 0), "{first_two:?}");
    assert!(world.max_load() <= 0.85, "{}", world.max_load());
    for _ in 0..40 {
        let decisions = scaler.step(&world.sample());
        assert!(decisions.is_empty(), "settled: {decisions:?}");
    }
}

#[test]
fn a_split_is_merged_back_lazily_once_load_falls_and_never_flaps() {
    let config = AutoscaleConfig {
        scale_in_steps: 5,
        repack_steps: 30,
        ..AutoscaleConfig::default()
    };
    let mut world = hot_partition(2, 1.2, &[1]);
    let mut scaler = Autoscaler::new(config);
    let mut seed = 7u64;
    let mut log = Vec::new();
    for step in 1..=200u64 {
        if step == 20 {
            // Load falls: the two halves now want 0.1 cores each.
            world.set_demand(BULK, 0.1);
        }
        // Noise of 2% of a core on every actor.
        let mut sample = world.sample();
        for a in &mut sample.actors {
            let wobble = (noise(&mut seed) * 0.02 * STEP_NS as f64) as i64;
            a.cpu_ns = (a.cpu_ns as i64 + wobble).max(0) as u64;
        }
        let decisions = scaler.step(&sample);
        world.apply(&decisions);
        log.extend(decisions.into_iter().map(|d| (step, d)));
    }
    let merges: Vec<u64> = log
        .iter()
        .filter(|(_, d)| matches!(d.action, Action::Merge { .. }))
        .map(|(step, _)| *step)
        .collect();
    let decisions: Vec<Decision> = log.iter().map(|(_, d)| d.clone()).collect();
    assert_eq!(splits_and_merges(&decisions), (1, 1), "{log:?}");
    // Not before the split is `repack_steps` old, and after calm steps.
    let split = log
        .iter()
        .find(|(_, d)| matches!(d.action, Action::Split { .. }))
        .map(|(step, _)| *step)
        .unwrap();
    assert!(
        merges[0] >= split + 30,
        "split at step {split}, merged at step {}",
        merges[0]
    );
    assert!(world.max_load() <= 0.6, "{}", world.max_load());
}

#[test]
fn a_hot_stage_that_keeps_partials_goes_parallel_and_back_to_ordered_lazily() {
    let config = AutoscaleConfig {
        scale_in_steps: 5,
        repack_steps: 30,
        ..AutoscaleConfig::default()
    };
    // Partition 0 wants 1.2 cores, partition 1 is on shard 1; the stage
    // keeps partials.
    let mut world = hot_partition(2, 1.2, &[1]);
    world.jobs.get_mut(&BULK).unwrap().parallelizable = 1 << 2;
    let mut scaler = Autoscaler::new(config);
    let mut log = Vec::new();
    for step in 1..=200u64 {
        if step == 20 {
            world.set_demand(BULK, 0.1);
        }
        let decisions = scaler.step(&world.sample());
        world.apply(&decisions);
        if step == 2 {
            assert!(world.max_load() <= 0.85, "spread: {}", world.max_load());
        }
        log.extend(decisions.into_iter().map(|d| (step, d)));
    }
    let kinds: Vec<(u64, &Action)> = log.iter().map(|(s, d)| (*s, &d.action)).collect();
    let parallel = Action::Parallel {
        job: BULK,
        stage: 2,
    };
    let ordered = Action::Ordered {
        job: BULK,
        stage: 2,
    };
    assert_eq!(kinds.first(), Some(&(1, &parallel)), "{log:?}");
    let back: Vec<u64> = kinds
        .iter()
        .filter(|(_, a)| **a == ordered)
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(back.len(), 1, "back to ordered once: {log:?}");
    assert!(
        back[0] >= 31,
        "not before the switch is 30 steps old: {log:?}"
    );
    assert_eq!(
        kinds.iter().filter(|(_, a)| **a == parallel).count(),
        1,
        "no flapping: {log:?}"
    );
}

/// A world of `shards` where BULK's source (stage 0, one partition, on
/// shard 0) wants `demand` cores, three quarters of it the steps fused into
/// it, with a relay partition (stage 3) on every shard; an LC actor on the
/// last shard.
fn busy_chain(shards: usize, demand: f64) -> World {
    let mut world = World::new(shards);
    let bulk = world.jobs.get_mut(&BULK).unwrap();
    bulk.unchainable = 1 << 0;
    bulk.relays = 1 << 3;
    world.add(actor(BULK, 0, 0), 0, demand);
    for shard in 0..shards {
        world.add(actor(BULK, 3, shard as u32), shard, 0.0);
    }
    world.add(actor(LC, 1, 0), shards - 1, 0.1);
    world
}

#[test]
fn a_producer_busy_with_its_fused_steps_has_them_split_out_at_once_and_fused_back_lazily() {
    for shards in [2, 4, 8] {
        let config = AutoscaleConfig {
            scale_in_steps: 5,
            repack_steps: 30,
            ..AutoscaleConfig::default()
        };
        // Light for 5 steps (the job's input rate is known by then: a split
        // out is judged against it), then a load step.
        let mut world = busy_chain(shards, 0.3);
        let mut scaler = Autoscaler::new(config);
        let mut log = Vec::new();
        for step in 1..=200u64 {
            if step == 6 {
                for a in &mut world.actors {
                    if a.0 == actor(BULK, 0, 0) {
                        a.2 = 1.3;
                    }
                }
            }
            if step == 25 {
                // Load falls: 0.05 cores on each of BULK's actors.
                world.set_demand(BULK, 0.05);
            }
            let decisions = scaler.step(&world.sample());
            world.apply(&decisions);
            if step == 7 {
                // Converged in two steps at most.
                assert!(
                    world.max_load() <= 0.85,
                    "{shards} shards: {}",
                    world.max_load()
                );
            }
            log.extend(decisions.into_iter().map(|d| (step, d)));
        }
        let unchain = Action::Unchain {
            job: BULK,
            stage: 0,
        };
        let rechain = Action::Rechain {
            job: BULK,
            stage: 0,
        };
        let kinds: Vec<(u64, &Action)> = log.iter().map(|(s, d)| (*s, &d.action)).collect();
        // Split out at the load step (cold shards were drained before it).
        assert_eq!(
            kinds.iter().find(|(_, a)| **a == unchain),
            Some(&(6, &unchain)),
            "{shards} shards: {log:?}"
        );
        assert_eq!(
            kinds.iter().filter(|(_, a)| **a == unchain).count(),
            1,
            "{shards} shards: no flapping: {log:?}"
        );
        let back: Vec<u64> = kinds
            .iter()
            .filter(|(_, a)| **a == rechain)
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(back.len(), 1, "{shards} shards: fused back once: {log:?}");
        assert!(
            back[0] >= 36,
            "{shards} shards: not before the split is 30 steps old: {log:?}"
        );
        // Fused back, the source runs it all: 0.05 + 0.05 per relay.
        let source = world.demand(actor(BULK, 0, 0));
        assert!(
            (source - 0.05 * (shards as f64 + 1.0)).abs() < 1e-9,
            "{shards} shards: {source}"
        );
    }
}

#[test]
fn a_producer_whose_relays_would_not_fit_one_core_stays_split() {
    let config = AutoscaleConfig {
        scale_in_steps: 5,
        repack_steps: 30,
        ..AutoscaleConfig::default()
    };
    let mut world = busy_chain(4, 1.3);
    let mut scaler = Autoscaler::new(config);
    let mut log = Vec::new();
    for step in 1..=200u64 {
        if step == 20 {
            // Calm (every shard under the target), but the source and its
            // relays together want 0.2 + 4 x 0.15 = 0.8 cores: more than a
            // packed shard takes.
            world.set_demand(BULK, 0.15);
            for a in &mut world.actors {
                if a.0 == actor(BULK, 0, 0) {
                    a.2 = 0.2;
                }
            }
        }
        let decisions = scaler.step(&world.sample());
        world.apply(&decisions);
        log.extend(decisions.into_iter().map(|d| (step, d)));
    }
    let actions: Vec<&Action> = log.iter().map(|(_, d)| &d.action).collect();
    assert!(
        actions.contains(&&Action::Unchain {
            job: BULK,
            stage: 0
        }),
        "{log:?}"
    );
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Rechain { .. })),
        "{log:?}"
    );
}

#[test]
fn a_keyed_producer_whose_split_finds_no_room_has_its_steps_split_out() {
    // BULK stage 2 (keyed, 2 partitions, both on shard 0) wants 1.3 cores in
    // partition 0, three quarters of it its fused steps; shard 1 is at 0.4,
    // so no partition can take half of its measured core there.
    let mut world = World::new(2);
    let bulk = world.jobs.get_mut(&BULK).unwrap();
    bulk.splittable = 1 << 2;
    bulk.unchainable = 1 << 2;
    bulk.relays = 1 << 5;
    world.add(actor(BULK, 2, 0), 0, 1.3);
    world.add(actor(BULK, 2, 1), 0, 0.0);
    world.add(actor(BULK, 5, 0), 0, 0.0);
    world.add(actor(BULK, 5, 1), 1, 0.0);
    world.add(actor(LC, 1, 0), 1, 0.4);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    // Split out once the job's input rate is known (5 steps in); never
    // split: no partition found room.
    let mut decisions = Vec::new();
    for _ in 0..5 {
        decisions.extend(scaler.step(&world.sample()));
    }
    assert_eq!(splits_and_merges(&decisions), (0, 0), "{decisions:?}");
    assert!(
        decisions.iter().any(|d| d.step == 5
            && d.action
                == Action::Unchain {
                    job: BULK,
                    stage: 2
                }),
        "{decisions:?}"
    );
}

#[test]
fn steps_that_must_stay_on_relays_do_not_hold_back_an_older_split_s_merge() {
    let config = AutoscaleConfig {
        scale_in_steps: 5,
        repack_steps: 30,
        ..AutoscaleConfig::default()
    };
    // A hot keyed partition on shard 0 (split at step 1), and a source on
    // shard 1 whose steps get busy at step 5 (split out then: the newer).
    let mut world = hot_partition(4, 1.2, &[3]);
    let bulk = world.jobs.get_mut(&BULK).unwrap();
    bulk.unchainable = 1 << 0;
    bulk.relays = 1 << 5;
    world.add(actor(BULK, 0, 0), 1, 0.1);
    for shard in 0..4 {
        world.add(actor(BULK, 5, shard as u32), shard, 0.0);
    }
    let mut scaler = Autoscaler::new(config);
    let mut log = Vec::new();
    for step in 1..=200u64 {
        if step == 5 {
            for a in &mut world.actors {
                if a.0 == actor(BULK, 0, 0) {
                    a.2 = 1.3;
                }
            }
        }
        if step == 20 {
            // Calm, but the source and its relays want 0.2 + 4 x 0.12 cores
            // in all: more than a packed shard takes. The split's halves are
            // light.
            world.set_demand(BULK, 0.12);
            for a in &mut world.actors {
                if a.0 == actor(BULK, 0, 0) {
                    a.2 = 0.2;
                } else if a.0.job == BULK && a.0.operator == 2 {
                    a.2 = 0.02;
                }
            }
        }
        let decisions = scaler.step(&world.sample());
        world.apply(&decisions);
        log.extend(decisions.into_iter().map(|d| (step, d)));
    }
    let at = |want: fn(&Action) -> bool| {
        log.iter()
            .filter(|(_, d)| want(&d.action))
            .map(|(s, _)| *s)
            .collect::<Vec<u64>>()
    };
    let (splits, unchains) = (
        at(|a| matches!(a, Action::Split { .. })),
        at(|a| matches!(a, Action::Unchain { .. })),
    );
    assert_eq!(splits, vec![1], "{log:?}");
    assert_eq!(unchains.len(), 1, "{log:?}");
    assert!(unchains[0] > splits[0], "{log:?}");
    assert_eq!(
        at(|a| matches!(a, Action::Merge { .. })).len(),
        1,
        "{log:?}"
    );
    assert!(
        at(|a| matches!(a, Action::Rechain { .. })).is_empty(),
        "{log:?}"
    );
}

#[test]
fn steps_split_out_that_slow_their_job_down_are_fused_back_and_not_split_out_again_soon() {
    let cooldown = AutoscaleConfig::default().cooldown_steps;
    // The job takes 1,000 records in a step fused; split out, 800 (the
    // relays cost more than the cheap steps they take) or 1,500.
    for (after, fused_back) in [(800u64, true), (1_500, false)] {
        // The source light for 5 steps (its input rate is known by then),
        // then busy.
        let mut world = busy_chain(2, 0.3);
        let mut scaler = Autoscaler::new(AutoscaleConfig::default());
        let mut log = Vec::new();
        for step in 1..=150u64 {
            if step == 6 {
                for a in &mut world.actors {
                    if a.0 == actor(BULK, 0, 0) {
                        a.2 = 1.3;
                    }
                }
            }
            let split = log
                .iter()
                .any(|(_, d): &(u64, Decision)| matches!(d.action, Action::Unchain { .. }));
            world.jobs.get_mut(&BULK).unwrap().records_in += if split { after } else { 1_000 };
            let decisions = scaler.step(&world.sample());
            world.apply(&decisions);
            log.extend(decisions.into_iter().map(|d| (step, d)));
        }
        let at = |want: fn(&Action) -> bool| {
            log.iter()
                .filter(|(_, d)| want(&d.action))
                .map(|(s, _)| *s)
                .collect::<Vec<u64>>()
        };
        // Split out as soon as the source is busy; fused back once the
        // figures show the job slower, and not split out again within
        // `repack_steps` (200).
        let unchains = at(|a| matches!(a, Action::Unchain { .. }));
        assert_eq!(unchains, vec![6], "{log:?}");
        let back = at(|a| matches!(a, Action::Rechain { .. }));
        match fused_back {
            true => assert_eq!(back, vec![6 + cooldown], "{log:?}"),
            false => assert!(back.is_empty(), "{log:?}"),
        }
    }
}

/// Over nodes: this node's two shards both overloaded, nothing here to
/// split: one actor of a keyed stage (`crossable`) a step moves to the
/// least loaded shard of another node that has room, counting what was
/// spilled onto it until its node's figures show it; never an actor that
/// may not cross, never onto a shard over the target.
#[test]
fn over_nodes_a_shard_nothing_here_relieves_spills_one_keyed_actor_a_step_to_another_node() {
    let world = || {
        let mut world = World::new(2);
        for p in 0..4 {
            world.add(actor(BULK, 2, p), 0, 0.4);
            world.add(actor(LC, 1, p), 1, 0.3);
        }
        world.jobs.get_mut(&BULK).unwrap().crossable = 1 << 2;
        world
    };
    // Shards 2 and 3 are another node's.
    let remote = vec![(ShardId(2), 0.1), (ShardId(3), 0.5)];
    let mut w = world();
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut spilled: BTreeMap<ShardId, Vec<f64>> = BTreeMap::new();
    for _ in 0..4 {
        let mut sample = w.sample();
        sample.remote = remote.clone();
        let decisions = scaler.step(&sample);
        let spills: Vec<(ActorId, ShardId)> = decisions
            .iter()
            .filter_map(|d| match d.action {
                Action::Move { actor, to, .. } if to.index() >= 2 => Some((actor, to)),
                _ => None,
            })
            .collect();
        assert!(spills.len() <= 1, "{decisions:?}");
        for d in &decisions {
            if let Action::Move { to, .. } = d.action {
                if to.index() >= 2 {
                    assert!(d.reason.contains("(another node's)"), "{d}");
                }
            }
        }
        for (moved, to) in spills {
            assert_eq!(
                (moved.job, moved.operator),
                (BULK, 2),
                "only a crossable actor"
            );
            let busy = w.demand(moved).min(1.0);
            spilled.entry(to).or_default().push(busy);
            // On the other node now: out of this node's figures.
            w.actors.retain(|a| a.0 != moved);
        }
        let local: Vec<Decision> = decisions
            .iter()
            .filter(|d| matches!(d.action, Action::Move { to, .. } if to.index() < 2))
            .cloned()
            .collect();
        w.apply(&local);
    }
    assert!(!spilled.is_empty(), "nothing spilled");
    // Each remote shard took no more than it had room for, counting what
    // was spilled onto it (its own figure stayed as told).
    for (shard, loads) in &spilled {
        let told = remote.iter().find(|(s, _)| s == shard).unwrap().1;
        let before_last: f64 = loads[..loads.len() - 1].iter().sum();
        assert!(told + before_last <= 0.7 + 1e-9, "{shard}: {loads:?}");
    }
    assert!(
        spilled.contains_key(&ShardId(2)),
        "the least loaded first: {spilled:?}"
    );
    // Not crossable: no spill.
    let mut w = world();
    w.jobs.get_mut(&BULK).unwrap().crossable = 0;
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut sample = w.sample();
    sample.remote = remote.clone();
    let decisions = scaler.step(&sample);
    assert!(
        !decisions
            .iter()
            .any(|d| matches!(d.action, Action::Move { to, .. } if to.index() >= 2)),
        "{decisions:?}"
    );
    // Every other node's shard over the target: no spill.
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut sample = world().sample();
    sample.remote = vec![(ShardId(2), 0.75), (ShardId(3), 0.9)];
    let decisions = scaler.step(&sample);
    assert!(
        !decisions
            .iter()
            .any(|d| matches!(d.action, Action::Move { to, .. } if to.index() >= 2)),
        "{decisions:?}"
    );
    // One shard here, another node's with room: a spill still (one shard
    // of its own is no reason to stay stuck).
    let mut w = World::new(1);
    for p in 0..4 {
        w.add(actor(BULK, 2, p), 0, 0.4);
    }
    w.jobs.get_mut(&BULK).unwrap().crossable = 1 << 2;
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    let mut sample = w.sample();
    sample.remote = vec![(ShardId(1), 0.0)];
    let decisions = scaler.step(&sample);
    assert!(
        decisions
            .iter()
            .any(|d| matches!(d.action, Action::Move { to: ShardId(1), .. })),
        "{decisions:?}"
    );
}

/// Over nodes, what was spilled onto another node's shard counts on its
/// told load for `spill_hold_steps` after the last spill there, then no
/// more (a figure told since shows it); a node of one shard measures its
/// load though it has nowhere to move (it tells it to the others).
#[test]
fn a_spill_counts_on_its_shard_for_the_hold_and_a_lone_shard_is_measured() {
    let mut w = World::new(1);
    for p in 0..8 {
        w.add(actor(BULK, 2, p), 0, 0.4);
    }
    w.jobs.get_mut(&BULK).unwrap().crossable = 1 << 2;
    let config = AutoscaleConfig::default();
    let hold = config.spill_hold_steps;
    let mut scaler = Autoscaler::new(config);
    let mut spill_steps = Vec::new();
    for step in 1..=hold + 4 {
        let mut sample = w.sample();
        // Told 0.5 all along: the other node's figures never show them.
        sample.remote = vec![(ShardId(1), 0.5)];
        for d in scaler.step(&sample) {
            if let Action::Move { actor, to, .. } = d.action {
                assert_eq!(to, ShardId(1), "{d}");
                spill_steps.push(step);
                w.actors.retain(|a| a.0 != actor);
            }
        }
    }
    // Each actor is 0.125 busy (eight share a core): two fit under the
    // target on 0.5, then none until the hold of the second has passed.
    assert_eq!(spill_steps[..2], [1, 2], "{spill_steps:?}");
    assert_eq!(spill_steps.get(2), Some(&(2 + hold)), "{spill_steps:?}");
    // Alone, nowhere to go: no decision, but its load is measured.
    let mut w = World::new(1);
    w.add(actor(BULK, 2, 0), 0, 0.6);
    let mut scaler = Autoscaler::new(AutoscaleConfig::default());
    assert!(scaler.step(&w.sample()).is_empty());
    assert_eq!(scaler.loads().len(), 1);
    assert!(
        (scaler.loads()[0] - 0.6).abs() < 1e-6,
        "{:?}",
        scaler.loads()
    );
}

//! The loop each shard's executor runs: drain the rings and the external queue into
//! the core, run turns, flush staged packets into the rings, and park when there is
//! nothing to do.
//!
//! One loop pass is bounded (`RING_DRAIN_MAX` packets per ring, `TURNS_PER_PASS`
//! turns), so inputs are polled at least every few hundred microseconds even under
//! full load, and the executor's other tasks get the core at `yield_if_needed`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::actor::ActorFactory;
use crate::clock::Clock;
use crate::ids::ShardId;
use crate::ring::{Consumer, Producer};

use super::shard::{Packet, ShardCore};
use super::store::StateStore;
use super::{RuntimeConfig, Shared};

/// Packets taken from one ring per pass.
const RING_DRAIN_MAX: usize = 1024;
/// Requests taken from the external queue per pass.
const EXTERNAL_DRAIN_MAX: usize = 256;
/// Turns run per pass before inputs are polled again.
const TURNS_PER_PASS: u32 = 64;

pub(super) struct ShardThread<M: Send + 'static> {
    pub id: ShardId,
    pub shards: u16,
    pub config: RuntimeConfig,
    pub outputs: Vec<Option<Producer<Packet<M>>>>,
    pub inputs: Vec<Option<Consumer<Packet<M>>>>,
    pub factory: Arc<dyn ActorFactory<M>>,
    pub store: Arc<dyn StateStore>,
    pub shared: Arc<Shared<M>>,
}

impl<M: Send + 'static> ShardThread<M> {
    pub async fn run(mut self) {
        let mut core = ShardCore::new(
            self.id,
            self.shards,
            self.config.shard.clone(),
            Clock::Monotonic,
            self.factory.clone(),
            self.store.clone(),
        );
        let housekeeping_ns = self.config.housekeeping_interval.as_nanos() as u64;
        let mut next_housekeeping_ns = crate::clock::monotonic_ns() + housekeeping_ns;
        loop {
            core.tick();
            let mut progress = self.drain_inputs(&mut core);
            progress |= core.fire_timers() > 0;
            for _ in 0..TURNS_PER_PASS {
                if !core.run_turn() {
                    break;
                }
                progress = true;
            }
            self.flush(&mut core);
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            let now_ns = crate::clock::monotonic_ns();
            if now_ns >= next_housekeeping_ns {
                core.deactivate_idle();
                next_housekeeping_ns = now_ns + housekeeping_ns;
            }
            if progress || core.has_staged() || core.has_runnable() {
                glommio::yield_if_needed().await;
                continue;
            }
            core.count_park();
            let doorbell = self.shared.doorbells[self.id.index()].clone();
            let inputs = &self.inputs;
            let shared = &self.shared;
            let me = self.id.index();
            let park = doorbell.park(|| {
                shared.stop.load(Ordering::Acquire)
                    || shared.external[me].len.load(Ordering::Acquire) > 0
                    || inputs.iter().flatten().any(|c| !c.is_empty())
            });
            let wake_ns = core
                .next_timer_ns()
                .map_or(next_housekeeping_ns, |t| t.min(next_housekeeping_ns));
            let wait = Duration::from_nanos(wake_ns.saturating_sub(now_ns).max(1));
            // A timeout is the housekeeping tick, not an error.
            let _ = glommio::timer::timeout(wait, async {
                park.await;
                Ok(())
            })
            .await;
        }
    }

    fn drain_inputs(&mut self, core: &mut ShardCore<M>) -> bool {
        let mut progress = false;
        for input in self.inputs.iter_mut().flatten() {
            progress |= input.drain(RING_DRAIN_MAX, |packet| core.receive(packet)) > 0;
        }
        let queue = &self.shared.external[self.id.index()];
        if queue.len.load(Ordering::Acquire) > 0 {
            let mut q = queue.queue.lock().expect("external queue lock poisoned");
            let mut taken = 0;
            while taken < EXTERNAL_DRAIN_MAX && core.injector_ready() {
                let Some(request) = q.pop_front() else {
                    break;
                };
                core.external(request);
                taken += 1;
            }
            queue.len.store(q.len(), Ordering::Release);
            progress |= taken > 0;
        }
        progress
    }

    fn flush(&mut self, core: &mut ShardCore<M>) {
        for (target, output) in self.outputs.iter_mut().enumerate() {
            let Some(output) = output else {
                continue;
            };
            let staged = core.staging(ShardId(target as u16));
            if !staged.is_empty() && output.push_from(staged) > 0 {
                self.shared.doorbells[target].ring();
            }
        }
    }
}

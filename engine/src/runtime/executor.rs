//! The loop each shard's executor runs: drain the rings and the external queue into
//! the core, run turns, flush staged packets into the rings, and park when there is
//! nothing to do.
//!
//! One loop pass is bounded (`RING_DRAIN_MAX` packets per ring, `TURNS_PER_PASS`
//! turns, and `PASS_NS_MAX` of turns), so inputs are polled and due timers fire
//! at least every few hundred microseconds even under full load (a paced
//! source's next batch is a timer: a pass of 64 long turns would hold it up to
//! 13 ms), and the executor's other tasks get the core at `yield_if_needed`.
//!
//! `run_supervised` wraps the loop: a panic that escapes the core (actor panics
//! are caught inside it, see `shard`) ends the shard, marks it dead and tells the
//! failure hook, so that nothing waits for it. Packets toward a dead shard that no
//! longer fit in its ring are dropped and counted instead of retried forever.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::actor::ActorFactory;
use crate::clock::Clock;
use crate::ids::ShardId;
use crate::ring::{Consumer, Producer};

use super::shard::{External, Packet, ShardCore};
use super::store::StateStore;
use super::{panic_message, Failure, RuntimeConfig, Shared};

/// Packets taken from one ring per pass.
const RING_DRAIN_MAX: usize = 1024;
/// Requests taken from the external queue per pass.
const EXTERNAL_DRAIN_MAX: usize = 256;
/// Longest timed park: a timer due later (or at a nonsense time) re-parks.
const PARK_NS_MAX: u64 = 3_600_000_000_000;
/// Turns run per pass before inputs are polled again.
const TURNS_PER_PASS: u32 = 64;
/// Time a pass's turns may take before inputs and timers are looked at again
/// (a turn itself is bounded by `turn_ns_max`, 200 µs by default).
const PASS_NS_MAX: u64 = 300_000;
/// While a shard's file I/O is out, how often the executor lets glommio reap
/// its completions (a timer sleep: dearer than a pass is long).
const IO_YIELD_EVERY_NS: u64 = 500_000;
/// With the node's gateway on this shard's executor, how often a busy
/// shard lets glommio poll the sockets and run the gateway's tasks.
const GATEWAY_YIELD_EVERY_NS: u64 = 100_000;

pub(super) struct ShardThread<M: Send + 'static> {
    /// The shard's id in the run (global across nodes).
    pub id: ShardId,
    /// Its index among this process's shards.
    pub local: usize,
    pub layout: super::remote::Layout,
    pub config: RuntimeConfig,
    /// Per shard of the run, by global id (`None` for this one).
    pub outputs: Vec<Option<Producer<Packet<M>>>>,
    pub inputs: Vec<Option<Consumer<Packet<M>>>>,
    pub factory: Arc<dyn ActorFactory<M>>,
    pub store: Arc<dyn StateStore>,
    pub shared: Arc<Shared<M>>,
    pub ready: ReadyGuard,
    /// The machine's online cores (`machine_cores`), for `SpareCores`.
    pub machine_cores: usize,
    /// The node's gateway, on a node of one shard: `run_supervised` runs
    /// it as tasks of this shard's executor. The shard then never spins
    /// (the gateway, which brings other nodes' packets, could not run
    /// meanwhile), and while busy it lets glommio poll its sockets every
    /// `GATEWAY_YIELD_EVERY_NS`, and at once when it only waits for room
    /// in a ring (to the gateway).
    pub gateway: Option<super::remote::GatewayTask>,
}

/// Tells `Runtime::start` whether this shard came up: `true` once its loop runs,
/// `false` if it is dropped before (its executor could not be built).
pub(super) struct ReadyGuard {
    shard: usize,
    ready: Option<mpsc::Sender<(usize, bool)>>,
}

impl ReadyGuard {
    pub fn new(shard: usize, ready: mpsc::Sender<(usize, bool)>) -> Self {
        ReadyGuard {
            shard,
            ready: Some(ready),
        }
    }

    pub fn signal(&mut self, up: bool) {
        if let Some(ready) = self.ready.take() {
            // `start` may have given up waiting; nothing to do then.
            let _ = ready.send((self.shard, up));
        }
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.signal(false);
    }
}

/// A `Duration` in ns, saturating at `u64::MAX` (about 584 years).
pub(super) fn saturating_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Polls a future inside `catch_unwind`: a panic becomes `Err(payload)`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

impl<M: Send + 'static> ShardThread<M> {
    /// Run the shard (and the node's gateway, when it runs here); if it
    /// panics, or the gateway does, mark it dead and tell the failure hook
    /// (a node without its gateway reaches no other node: its jobs fail).
    pub async fn run_supervised(mut self) {
        let id = self.id;
        let shared = self.shared.clone();
        let hook = self.config.on_failure.clone();
        let gateway_here = self.gateway.is_some();
        let gateway = self.gateway.take().map(|task| {
            let (shared, hook) = (shared.clone(), hook.clone());
            glommio::spawn_local(async move {
                if let Err(payload) = CatchUnwind(Box::pin(task.into_future())).await {
                    shared.mark_dead(id);
                    if let Some(hook) = hook {
                        hook(Failure {
                            actor: None,
                            shard: id,
                            message: format!(
                                "its node's gateway: {}",
                                panic_message(payload.as_ref())
                            ),
                        });
                    }
                }
            })
        });
        let run = CatchUnwind(Box::pin(self.run(gateway_here)));
        if let Err(payload) = run.await {
            shared.mark_dead(id);
            if let Some(hook) = hook {
                hook(Failure {
                    actor: None,
                    shard: id,
                    message: panic_message(payload.as_ref()),
                });
            }
        }
        // The gateway's send loop ends with the runtime's stop.
        if let Some(gateway) = gateway {
            gateway.await;
        }
    }

    async fn run(mut self, gateway_here: bool) {
        let mut core = ShardCore::new(
            self.id,
            self.layout.total(),
            self.config.shard.clone(),
            Clock::Monotonic,
            self.factory.clone(),
            self.store.clone(),
        );
        core.set_failure_hook(self.config.on_failure.clone());
        core.set_local_shards(self.layout.local_range());
        super::enter_shard();
        if self.config.fail_start_of_shard_for_test == Some(self.local) {
            return; // the ready guard, dropped, says this shard did not come up
        }
        self.ready.signal(true);
        let housekeeping_ns = saturating_ns(self.config.housekeeping_interval);
        let mut next_housekeeping_ns = crate::clock::monotonic_ns().saturating_add(housekeeping_ns);
        let mut last_io_yield_ns = 0u64;
        let upkeep = super::upkeep_hook();
        let upkeep_every_ns = saturating_ns(super::UPKEEP_EVERY);
        let mut last_upkeep_ns = 0u64;
        let mut spare = SpareCores::new(self.machine_cores);
        let mut backoff = SpinBackoff::default();
        // Measured from the start, so that a shard busy from its first
        // pass reports its (zero) idle time too.
        core.add_idle_ns(0);
        let spins = !self.config.spin_before_park.is_zero() && !gateway_here;
        let io_yield_every_ns = if gateway_here {
            GATEWAY_YIELD_EVERY_NS
        } else {
            IO_YIELD_EVERY_NS
        };
        loop {
            core.tick();
            let mut progress = self.drain_inputs(&mut core);
            progress |= core.fire_timers() > 0;
            let pass_start_ns = crate::clock::monotonic_ns();
            for _ in 0..TURNS_PER_PASS {
                if !core.run_turn() {
                    break;
                }
                progress = true;
                // Hand what the turn sent to the other shards now, not at the end of
                // the pass: a pass can hold many turns, and the peer may be waiting.
                if core.has_staged() {
                    self.flush(&mut core);
                }
                if crate::clock::monotonic_ns().saturating_sub(pass_start_ns) > PASS_NS_MAX {
                    break;
                }
            }
            self.flush(&mut core);
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            let mut now_ns = crate::clock::monotonic_ns();
            if let Some(upkeep) = upkeep {
                if now_ns.saturating_sub(last_upkeep_ns) >= upkeep_every_ns {
                    upkeep();
                    now_ns = crate::clock::monotonic_ns();
                    last_upkeep_ns = now_ns;
                }
            }
            if now_ns >= next_housekeeping_ns {
                core.deactivate_idle();
                next_housekeeping_ns = now_ns.saturating_add(housekeeping_ns);
            }
            if progress || core.has_staged() || core.has_runnable() {
                // Only waiting for room in a full ring: with the gateway
                // here, that ring may be its, which drains only when this
                // task lets it run.
                let blocked = !progress && !core.has_runnable();
                let io_out = gateway_here || super::io_pending() > 0;
                if io_out
                    && ((gateway_here && blocked)
                        || now_ns.saturating_sub(last_io_yield_ns) >= io_yield_every_ns)
                {
                    // A busy shard's task is always runnable, and glommio polls
                    // io_uring only when no task is (or at its 100 ms preempt
                    // timer): a 1 µs sleep lets it reap the completions of the
                    // I/O tasks and run them, at most every
                    // `IO_YIELD_EVERY_NS` while any is out (a sleep costs more
                    // than a short pass).
                    last_io_yield_ns = now_ns;
                    glommio::timer::sleep(Duration::from_micros(1)).await;
                } else {
                    glommio::yield_if_needed().await;
                }
                if !progress && !core.has_runnable() {
                    // Only waiting for room in a full ring: idle, as a park is.
                    core.add_idle_ns(crate::clock::monotonic_ns().saturating_sub(pass_start_ns));
                }
                continue;
            }
            // From here until work comes the shard is idle (its load, for
            // the autoscaler, is the time it is not).
            if spins && spare.now(now_ns) && backoff.may_spin() {
                let spun = self.spin_for_work(&core, now_ns);
                // A spin that only waited out a timer gained nothing over
                // a timed park.
                backoff.spun(spun == Spun::Input);
                if spun != Spun::Nothing {
                    core.add_idle_ns(crate::clock::monotonic_ns().saturating_sub(now_ns));
                    continue;
                }
            }
            core.count_park();
            let doorbell = self.shared.doorbells[self.id.index()].clone();
            let inputs = &self.inputs;
            let shared = &self.shared;
            let me = self.local;
            // Requests from outside count as work only if the injector can take them;
            // while it waits for credit, an acknowledgement on a ring wakes the shard.
            let injector_ready = core.injector_ready();
            let park = doorbell.park(|| {
                shared.stop.load(Ordering::Acquire)
                    || (injector_ready && shared.external[me].len.load(Ordering::Acquire) > 0)
                    || inputs.iter().flatten().any(|c| !c.is_empty())
            });
            // Arm a timer only for a due actor timer or idle deactivation: a park with
            // nothing to wait for costs no timer, only the doorbell.
            let housekeeping = self
                .config
                .shard
                .idle_timeout_ns
                .map(|_| next_housekeeping_ns);
            let wake_ns = match (core.next_timer_ns(), housekeeping) {
                (Some(t), Some(h)) => Some(t.min(h)),
                (t, h) => t.or(h),
            };
            match wake_ns {
                Some(wake_ns) => {
                    // The spin took time: measure the wait from now.
                    let now_ns = crate::clock::monotonic_ns();
                    let wait_ns = wake_ns.saturating_sub(now_ns).clamp(1, PARK_NS_MAX);
                    let wait = Duration::from_nanos(wait_ns);
                    // A timeout is the timer or housekeeping tick, not an error.
                    let _ = glommio::timer::timeout(wait, async {
                        park.await;
                        Ok(())
                    })
                    .await;
                }
                None => park.await,
            }
            core.add_idle_ns(crate::clock::monotonic_ns().saturating_sub(now_ns));
        }
    }

    /// Poll the inputs for up to `spin_before_park` before parking: a shard that has
    /// just run dry usually gets more within microseconds (the next flush of a peer),
    /// and a park costs the peer an eventfd write and this shard an io_uring wait.
    fn spin_for_work(&self, core: &ShardCore<M>, now_ns: u64) -> Spun {
        let spin_ns = saturating_ns(self.config.spin_before_park);
        let me = self.local;
        let until_ns = now_ns.saturating_add(spin_ns);
        let mut polls = 0u32;
        loop {
            if self.shared.stop.load(Ordering::Acquire)
                || (core.injector_ready()
                    && self.shared.external[me].len.load(Ordering::Acquire) > 0)
                || self.inputs.iter().flatten().any(|c| !c.is_empty())
            {
                return Spun::Input;
            }
            polls += 1;
            // The clock costs more than a poll of the rings: read it every 32 polls.
            if polls.is_multiple_of(32) {
                let now_ns = crate::clock::monotonic_ns();
                if core.next_timer_ns().is_some_and(|t| t <= now_ns) {
                    return Spun::Timer;
                }
                if now_ns >= until_ns {
                    return Spun::Nothing;
                }
            }
            std::hint::spin_loop();
        }
    }

    fn drain_inputs(&mut self, core: &mut ShardCore<M>) -> bool {
        let mut progress = false;
        for input in self.inputs.iter_mut().flatten() {
            progress |= input.drain(RING_DRAIN_MAX, |packet| core.receive(packet)) > 0;
        }
        let queue = &self.shared.external[self.local];
        if queue.len.load(Ordering::Acquire) > 0 {
            let mut q = queue.lock();
            let mut taken = 0;
            while taken < EXTERNAL_DRAIN_MAX && core.injector_ready() {
                let Some(request) = q.pop_front() else {
                    break;
                };
                core.external(request);
                taken += 1;
            }
            if !core.injector_ready() {
                // Sends wait for credit in order; statistics and migrations need not
                // wait behind them.
                let mut i = 0;
                while i < q.len() && taken < EXTERNAL_DRAIN_MAX {
                    if matches!(q[i], External::Send(_)) {
                        i += 1;
                    } else if let Some(request) = q.remove(i) {
                        core.external(request);
                        taken += 1;
                    }
                }
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
            let target_id = ShardId(target as u16);
            let staged = core.staging(target_id);
            if staged.is_empty() {
                continue;
            }
            if output.push_from(staged) > 0 {
                self.shared.doorbells[target].ring();
            }
            // A full ring toward a dead shard never drains: drop what is left.
            if !staged.is_empty() && self.shared.is_dead(target_id) {
                core.discard_staging(target_id);
            }
            core.trim_staging(target_id);
        }
    }
}

/// What a spin before a park came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spun {
    /// A packet on a ring, a request from outside, or the stop.
    Input,
    /// Only a timer came due.
    Timer,
    /// Nothing, within `spin_before_park`.
    Nothing,
}

/// Spins that found no input make the next ones rarer: after a spin that
/// ran out or only waited out a timer, the shard parks at once the next
/// 1, 2, 4, ... up to [`SPIN_SKIPS_MAX`] times it runs dry; a spin that
/// found input (a packet, a request) starts again from none. A shard woken
/// by its own timers, as a paced source's is every 100 µs, never gains
/// from a spin: spinning each time cost it about half a core (`perf`: 59%
/// of a paced q5's samples in `spin_for_work`), and made a light job look
/// busy to the cluster's leader, which weighs nodes by their runs' CPU.
#[derive(Debug, Default)]
pub(super) struct SpinBackoff {
    /// Times to park at once after the last spin that ran out.
    skips: u32,
    /// What is left of them.
    left: u32,
}

/// The most times in a row a shard parks without spinning.
const SPIN_SKIPS_MAX: u32 = 64;

impl SpinBackoff {
    /// Whether to spin this time the shard runs dry.
    pub fn may_spin(&mut self) -> bool {
        if self.left > 0 {
            self.left -= 1;
            return false;
        }
        true
    }

    /// What the spin came to.
    pub fn spun(&mut self, found: bool) {
        if found {
            self.skips = 0;
        } else {
            self.skips = self.skips.saturating_mul(2).clamp(1, SPIN_SKIPS_MAX);
            self.left = self.skips;
        }
    }
}

/// Whether the machine has a core to spare for a shard's spin before it
/// parks: no more threads runnable on the machine than its online cores
/// (the spinning thread among them) at each of the last
/// `SPARE_READINGS` readings of the kernel's count of runnable threads
/// (`/proc/loadavg`, machine-wide), taken when the shard is about to spin,
/// at most every `SPARE_CHECK_NS`. Where threads wait for a core (more
/// shards and gateways than cores, or another process busy), a spin only
/// delays the thread that would bring the work. Spare when the count
/// cannot be read.
pub(super) struct SpareCores {
    cores: usize,
    checked_ns: Option<u64>,
    /// One bit per reading, the latest lowest: set where the count was
    /// over `cores`.
    over: u32,
}

/// How often `SpareCores` reads the count (a read costs a few
/// microseconds; a spin, up to `spin_before_park`).
const SPARE_CHECK_NS: u64 = 5_000_000;

/// The readings `SpareCores` remembers: a count seen over the cores
/// stops the spins for this many readings (at least 80 ms; readings are
/// taken only as the shard is about to spin): the count is of one moment,
/// and a busy machine shows some moments with a core free.
const SPARE_READINGS: u32 = 16;

impl SpareCores {
    pub fn new(cores: usize) -> SpareCores {
        SpareCores {
            cores,
            checked_ns: None,
            over: 0,
        }
    }

    /// Whether a core is spare as of the last readings (read again when
    /// the last is `SPARE_CHECK_NS` old).
    pub fn now(&mut self, now_ns: u64) -> bool {
        if self
            .checked_ns
            .is_none_or(|at| now_ns.saturating_sub(at) >= SPARE_CHECK_NS)
        {
            self.checked_ns = Some(now_ns);
            let running = std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|text| runnable_threads(&text));
            self.record(running);
        }
        self.over == 0
    }

    fn record(&mut self, running: Option<usize>) {
        let over = running.is_some_and(|running| running > self.cores);
        self.over = ((self.over << 1) | u32::from(over)) & ((1 << SPARE_READINGS) - 1);
    }
}

/// The machine's online cores, from `/sys/devices/system/cpu/online`
/// (whatever this thread's affinity); `None` if it cannot be read.
pub(super) fn machine_cores() -> Option<usize> {
    cpu_list_len(&std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?)
}

/// The CPUs in a kernel CPU list ("0-3,6,8-9" holds 7).
fn cpu_list_len(list: &str) -> Option<usize> {
    let mut cpus = 0;
    for part in list.trim().split(',') {
        cpus += match part.split_once('-') {
            Some((from, to)) => {
                let (from, to): (usize, usize) = (from.parse().ok()?, to.parse().ok()?);
                to.checked_sub(from)? + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (cpus > 0).then_some(cpus)
}

/// The runnable threads in `/proc/loadavg`'s text: the number before the
/// slash of its fourth field ("0.41 0.32 0.30 3/412 12345").
fn runnable_threads(loadavg: &str) -> Option<usize> {
    let field = loadavg.split_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_list_is_counted() {
        assert_eq!(cpu_list_len("0-1\n"), Some(2));
        assert_eq!(cpu_list_len("0-3,6,8-9"), Some(7));
        assert_eq!(cpu_list_len("5"), Some(1));
        assert_eq!(cpu_list_len(""), None);
        assert_eq!(cpu_list_len("3-1"), None);
        assert_eq!(cpu_list_len("a-b"), None);
        if std::path::Path::new("/sys/devices/system/cpu/online").exists() {
            assert!(machine_cores().is_some_and(|n| n >= 1));
        }
    }

    #[test]
    fn the_runnable_threads_are_read_from_loadavg() {
        assert_eq!(runnable_threads("1.41 1.49 1.62 3/101 13309\n"), Some(3));
        assert_eq!(runnable_threads("0.00 0.00 0.00 1/57 1"), Some(1));
        assert_eq!(runnable_threads("0.00 0.00 0.00"), None);
        assert_eq!(runnable_threads("a b c x/57 1"), None);
    }

    #[test]
    fn spins_that_run_out_are_skipped_ever_longer_and_one_that_finds_work_resets() {
        let mut backoff = SpinBackoff::default();
        let mut skipped_after = Vec::new();
        for _ in 0..8 {
            assert!(backoff.may_spin());
            backoff.spun(false);
            let mut skipped = 0;
            while !backoff.may_spin() {
                skipped += 1;
            }
            skipped_after.push(skipped);
        }
        assert_eq!(skipped_after, vec![1, 2, 4, 8, 16, 32, 64, 64]);
        backoff.spun(true);
        assert!(backoff.may_spin() && backoff.may_spin(), "reset by a find");
        backoff.spun(false);
        assert!(!backoff.may_spin(), "one skip after the first miss");
        assert!(backoff.may_spin());
    }

    #[test]
    fn a_core_is_spare_while_no_more_threads_ran_than_cores_at_the_last_readings() {
        let mut spare = SpareCores::new(2);
        spare.checked_ns = Some(0);
        assert!(spare.now(1), "spare until a reading says otherwise");
        spare.record(Some(3));
        assert!(!spare.now(2), "kept until the next reading is due");
        for _ in 1..SPARE_READINGS {
            spare.record(Some(2));
            assert_ne!(spare.over, 0, "the reading over is remembered");
        }
        spare.record(Some(1));
        assert_eq!(spare.over, 0, "forgotten after SPARE_READINGS readings");
        spare.record(None);
        assert_eq!(spare.over, 0, "an unreadable count leaves the cores spare");
        // Read again once SPARE_CHECK_NS passed: at least this thread runs.
        let mut none = SpareCores::new(0);
        assert_eq!(none.now(1), std::fs::metadata("/proc/loadavg").is_err());
        assert!(!none.now(1 + SPARE_CHECK_NS));
    }
}

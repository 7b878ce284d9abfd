//! Waking a parked consumer shard from the shards that feed it.
//!
//! A shard runs one loop task on its glommio executor. When none of its incoming
//! rings has work, the task parks: it awaits [`Doorbell::park`], so the executor
//! can sleep. A producer shard, after publishing to a ring, calls
//! [`Doorbell::ring`], which costs one fence and one load when the consumer is
//! awake (the common case under load) and wakes the task only if it is parked. The
//! wake crosses threads through glommio: a waker used on a foreign thread queues
//! itself on the owning executor's notifier, which interrupts that executor's sleep.
//!
//! This is separate from `ring` because one doorbell serves all the rings into a
//! shard, and because it is the only place the engine blocks on another core.
//!
//! # State
//!
//! `parked` is true from the moment the loop task has stored its waker and is about
//! to re-check the rings until someone clears it: the task itself when it stops
//! parking, or the one producer whose `swap(false)` returns true, which then owns
//! the duty to wake. `waker` is behind a mutex that only the park path and that one
//! producer touch; the hot path never locks it.
//!
//! # Why no wake-up is lost (Dekker)
//!
//! ```text
//! consumer (park, first poll)          producer (after publishing)
//!   store waker (mutex)                  tail.store(Release)   [ring.rs]
//!   parked.store(true, SeqCst)           fence(SeqCst)          F_p
//!   fence(SeqCst)             F_c        parked.load(Relaxed)
//!   has_work(): tail.load(Acquire)       if true: parked.swap(false) -> wake
//! ```
//!
//! The two SeqCst fences are totally ordered. If `F_c` comes first, the producer's
//! load of `parked`, sequenced after `F_p`, sees `true` or a later value: `false`
//! written by the consumer (which only does so when it has stopped parking) or by
//! another producer's swap (which then wakes it). If `F_p` comes first, the
//! consumer's load of `tail` sees the published item, `has_work()` is true and the
//! task does not sleep. Either way a published item is never left behind a sleeping
//! consumer. Without the fences both loads may read stale values (a store buffer
//! makes this happen on x86) and the wake-up is lost.
//!
//! The waker is stored before `parked` is set, so the producer whose swap returns
//! true (Acquire, reading the consumer's SeqCst store) finds it. A wake that arrives
//! after the task stopped parking only costs one spurious poll of the loop.
//!
//! [`Doorbell::wake_now`] wakes the last stored waker whatever `parked` says, for
//! shutdown: the caller sets its flag first and `has_work` must read that flag; the
//! mutex orders the flag against the re-check as the fences do for the rings.
//!
//! `engine/tests/loom_ring.rs` model-checks this protocol with the ring.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{fence, AtomicBool, Mutex, MutexGuard, Ordering};

/// Parks one consumer task and lets producers on other threads wake it.
/// Shared as `Arc<Doorbell>` between the consumer shard and its producers.
#[derive(Debug)]
pub struct Doorbell {
    parked: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Default for Doorbell {
    fn default() -> Self {
        Self::new()
    }
}

impl Doorbell {
    pub fn new() -> Self {
        Self {
            parked: AtomicBool::new(false),
            waker: Mutex::new(None),
        }
    }

    /// Producer side: call after publishing to a ring that feeds this doorbell's
    /// consumer. Wakes the consumer if it is parked.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.wake_stored();
        }
    }

    /// Wakes the consumer's last stored waker even if it is not parked, e.g. for
    /// shutdown. Set the condition that `has_work` reads before calling this.
    pub fn wake_now(&self) {
        self.parked.store(false, Ordering::SeqCst);
        self.wake_stored();
    }

    fn wake_stored(&self) {
        let waker = self.lock_waker().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn lock_waker(&self) -> MutexGuard<'_, Option<Waker>> {
        // The guarded code cannot panic, but recovering costs nothing.
        self.waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Consumer side: a future that completes at once if `has_work()` is true after
    /// announcing the park, and otherwise when a producer rings or `wake_now` is
    /// called. `has_work` must read every source of wake-ups: the rings'
    /// [`is_empty`](crate::ring::Consumer::is_empty) and any shutdown flag.
    pub fn park<'a, F>(&'a self, has_work: F) -> Park<'a, F>
    where
        F: Fn() -> bool + 'a,
    {
        Park {
            doorbell: self,
            has_work,
            state: ParkState::Start,
        }
    }
}

/// The future returned by [`Doorbell::park`].
#[derive(Debug)]
#[must_use = "a park does nothing unless awaited"]
pub struct Park<'a, F> {
    doorbell: &'a Doorbell,
    has_work: F,
    state: ParkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParkState {
    /// Not yet polled.
    Start,
    /// Announced as parked and returned `Pending`.
    Waiting,
    /// Returned `Ready`.
    Done,
}

impl<F: Fn() -> bool> Future for Park<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: no field is structurally pinned: `Park` never hands out a pinned
        // reference to `has_work` and moves nothing out of `self`.
        let this = unsafe { self.get_unchecked_mut() };
        let doorbell = this.doorbell;
        match this.state {
            ParkState::Start => {
                {
                    let mut waker = doorbell.lock_waker();
                    match waker.as_ref() {
                        Some(stored) if stored.will_wake(cx.waker()) => {}
                        _ => *waker = Some(cx.waker().clone()),
                    }
                }
                doorbell.parked.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if (this.has_work)() {
                    doorbell.parked.store(false, Ordering::Relaxed);
                    this.state = ParkState::Done;
                    return Poll::Ready(());
                }
                this.state = ParkState::Waiting;
                Poll::Pending
            }
            ParkState::Waiting => {
                // Woken by a producer (which cleared `parked`), by `wake_now`, or
                // spuriously: either way the loop re-checks its rings.
                doorbell.parked.store(false, Ordering::Relaxed);
                this.state = ParkState::Done;
                Poll::Ready(())
            }
            ParkState::Done => panic!("Park polled after completion"),
        }
    }
}

impl<F> Drop for Park<'_, F> {
    fn drop(&mut self) {
        // A park abandoned while waiting (the loop was cancelled) stops producers
        // from paying for wake-ups no one waits for.
        if self.state == ParkState::Waiting {
            self.doorbell.parked.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    #[derive(Default)]
    struct CountingWaker {
        wakes: AtomicUsize,
    }

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_once(park: Pin<&mut impl Future<Output = ()>>, waker: &Waker) -> Poll<()> {
        park.poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn park_with_work_is_ready_at_once_and_leaves_unparked() {
        let doorbell = Doorbell::new();
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut park = std::pin::pin!(doorbell.park(|| true));
        assert!(poll_once(park.as_mut(), &waker).is_ready());
        assert!(!doorbell.parked.load(Ordering::SeqCst));
        doorbell.ring();
        assert_eq!(counter.wakes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn ring_wakes_a_parked_consumer_once() {
        let doorbell = Doorbell::new();
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut park = std::pin::pin!(doorbell.park(|| false));
        assert!(poll_once(park.as_mut(), &waker).is_pending());
        doorbell.ring();
        doorbell.ring();
        assert_eq!(counter.wakes.load(Ordering::SeqCst), 1);
        assert!(poll_once(park.as_mut(), &waker).is_ready());
        assert!(!doorbell.parked.load(Ordering::SeqCst));
    }

    #[test]
    fn wake_now_wakes_and_dropped_park_unparks() {
        let doorbell = Doorbell::new();
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        {
            let mut park = std::pin::pin!(doorbell.park(|| false));
            assert!(poll_once(park.as_mut(), &waker).is_pending());
            assert!(doorbell.parked.load(Ordering::SeqCst));
        }
        assert!(!doorbell.parked.load(Ordering::SeqCst));
        doorbell.wake_now();
        assert_eq!(counter.wakes.load(Ordering::SeqCst), 1);
    }

    /// The wake crosses threads into a glommio executor: the loop task parks, a
    /// plain thread publishes and rings, and the executor wakes up.
    #[test]
    fn glommio_task_is_woken_from_another_thread() {
        use crate::ring::ring;
        use glommio::LocalExecutorBuilder;

        let (mut producer, consumer) = ring::<u64>(8);
        let doorbell = Arc::new(Doorbell::new());
        let producer_doorbell = doorbell.clone();
        let executor = LocalExecutorBuilder::default()
            .name("doorbell-test")
            .spawn(move || async move {
                let mut consumer = consumer;
                let mut received = Vec::new();
                while received.len() < 3 {
                    consumer.drain(8, |value| received.push(value));
                    if received.len() < 3 {
                        doorbell.park(|| !consumer.is_empty()).await;
                    }
                }
                received
            })
            .expect("spawn executor");
        for value in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            producer.push(value).expect("ring has room");
            producer_doorbell.ring();
        }
        assert_eq!(executor.join().expect("executor"), vec![0, 1, 2]);
    }
}

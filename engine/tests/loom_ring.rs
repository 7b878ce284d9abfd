//! Model-checks the cross-shard ring and the parking doorbell with loom: every
//! interleaving of the two threads and every value a weak-memory load may return.
//!
//! Run (as `scripts/test` does):
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p dirigo-engine --release --test loom_ring`
//!
//! The rings are tiny (capacity 2) and carry three items, so that every test wraps
//! around and fills the ring while the state space stays small.
#![cfg(loom)]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Wake, Waker};

use dirigo_engine::doorbell::Doorbell;
use dirigo_engine::ring::{ring, Consumer, Producer};
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

const ITEMS: u32 = 3;

fn push_retrying(producer: &mut Producer<u32>, mut value: u32) {
    while let Err(back) = producer.push(value) {
        value = back;
        thread::yield_now();
    }
}

fn pop_retrying(consumer: &mut Consumer<u32>) -> u32 {
    loop {
        if let Some(value) = consumer.pop() {
            return value;
        }
        thread::yield_now();
    }
}

#[test]
fn push_and_pop_deliver_every_item_in_order() {
    loom::model(|| {
        let (mut producer, mut consumer) = ring::<u32>(2);
        let sender = thread::spawn(move || {
            for value in 0..ITEMS {
                push_retrying(&mut producer, value);
            }
        });
        let received: Vec<u32> = (0..ITEMS).map(|_| pop_retrying(&mut consumer)).collect();
        sender.join().unwrap();
        assert_eq!(received, (0..ITEMS).collect::<Vec<_>>());
        assert!(consumer.is_empty());
    });
}

#[test]
fn push_from_and_drain_deliver_every_item_in_order() {
    loom::model(|| {
        let (mut producer, mut consumer) = ring::<u32>(2);
        let sender = thread::spawn(move || {
            let mut source: VecDeque<u32> = (0..ITEMS).collect();
            while !source.is_empty() {
                if producer.push_from(&mut source) == 0 {
                    thread::yield_now();
                }
            }
        });
        let mut received = Vec::new();
        while received.len() < ITEMS as usize {
            if consumer.drain(2, |value| received.push(value)) == 0 {
                thread::yield_now();
            }
        }
        sender.join().unwrap();
        assert_eq!(received, (0..ITEMS).collect::<Vec<_>>());
    });
}

/// Counts its drops in a loom atomic.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn items_left_in_the_ring_are_dropped_once_whichever_half_goes_last() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut producer, mut consumer) = ring::<DropCounter>(2);
        let sender_drops = drops.clone();
        let sender = thread::spawn(move || {
            let mut source: VecDeque<_> =
                (0..2).map(|_| DropCounter(sender_drops.clone())).collect();
            assert_eq!(producer.push_from(&mut source), 2);
            // `producer` is dropped here, possibly before or after `consumer`.
        });
        // Takes at most one of the two items, racing with the push.
        drop(consumer.pop());
        drop(consumer);
        sender.join().unwrap();
        assert_eq!(drops.load(Ordering::Relaxed), 2);
    });
}

/// A waker that records that it was woken.
struct FlagWaker {
    woken: AtomicBool,
}

impl Wake for FlagWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.woken.store(true, Ordering::Release);
    }
}

fn flag_waker() -> (std::sync::Arc<FlagWaker>, Waker) {
    let flag = std::sync::Arc::new(FlagWaker {
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(flag.clone());
    (flag, waker)
}

/// The consumer checks its ring, finds it empty and parks; the producer pushes and
/// rings. Whatever the interleaving, once the producer is done, either the park
/// completed at once (it saw the item) or the consumer's waker was woken: never an
/// item in the ring behind a parked, un-woken consumer.
#[test]
fn doorbell_never_loses_a_wake_up() {
    loom::model(|| {
        let (mut producer, mut consumer) = ring::<u32>(2);
        let doorbell = Arc::new(Doorbell::new());
        let producer_doorbell = doorbell.clone();
        let sender = thread::spawn(move || {
            producer.push(7).unwrap();
            producer_doorbell.ring();
        });

        let mut sender = Some(sender);
        let (flag, waker) = flag_waker();
        let mut cx = Context::from_waker(&waker);
        if consumer.pop().is_none() {
            {
                let mut park = pin!(doorbell.park(|| !consumer.is_empty()));
                if park.as_mut().poll(&mut cx).is_pending() {
                    sender.take().unwrap().join().unwrap();
                    assert!(
                        flag.woken.load(Ordering::Acquire),
                        "lost wake-up: item published, consumer parked, no wake"
                    );
                    assert_eq!(park.as_mut().poll(&mut cx), Poll::Ready(()));
                }
            }
            // Either the park saw the item, or the producer finished and woke us.
            assert_eq!(consumer.pop(), Some(7));
        }
        if let Some(sender) = sender {
            sender.join().unwrap();
        }
    });
}

/// Shutdown: a thread sets the flag that `has_work` reads and calls `wake_now`.
#[test]
fn wake_now_reaches_a_consumer_parking_concurrently() {
    loom::model(|| {
        let doorbell = Arc::new(Doorbell::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (remote_doorbell, remote_stop) = (doorbell.clone(), stop.clone());
        let stopper = thread::spawn(move || {
            remote_stop.store(true, Ordering::Release);
            remote_doorbell.wake_now();
        });

        let (flag, waker) = flag_waker();
        let mut cx = Context::from_waker(&waker);
        let mut park = pin!(doorbell.park(|| stop.load(Ordering::Acquire)));
        if park.as_mut().poll(&mut cx).is_pending() {
            stopper.join().unwrap();
            assert!(flag.woken.load(Ordering::Acquire), "lost shutdown wake-up");
        } else {
            stopper.join().unwrap();
        }
    });
}

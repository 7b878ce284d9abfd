//! Unit tests of the ring in a normal build; the interleavings are covered by
//! `engine/tests/loom_ring.rs`.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use super::*;

fn pop_all<T>(consumer: &mut Consumer<T>) -> Vec<T> {
    std::iter::from_fn(|| consumer.pop()).collect()
}

#[test]
fn capacity_is_rounded_up_to_a_power_of_two() {
    let cases = [
        (1, 1),
        (2, 2),
        (3, 4),
        (5, 8),
        (64, 64),
        (1000, 1024),
        (CAPACITY_ITEMS_MAX, CAPACITY_ITEMS_MAX),
    ];
    for (requested, expected) in cases {
        let (mut producer, consumer) = ring::<u8>(requested);
        assert_eq!(producer.capacity(), expected, "requested {requested}");
        assert_eq!(consumer.capacity(), expected, "requested {requested}");
        assert_eq!(producer.free_slots(), expected, "requested {requested}");
    }
}

#[test]
#[should_panic(expected = "must be positive")]
fn capacity_zero_is_rejected() {
    let _ = ring::<u8>(0);
}

#[test]
#[should_panic(expected = "above")]
fn capacity_above_max_is_rejected() {
    let _ = ring::<u8>(CAPACITY_ITEMS_MAX + 1);
}

#[test]
fn push_then_pop_is_fifo_and_full_gives_the_value_back() {
    let (mut producer, mut consumer) = ring(4);
    assert!(consumer.is_empty());
    assert_eq!(consumer.pop(), None);
    for value in 0..4 {
        producer.push(value).unwrap();
    }
    assert_eq!(producer.push(4), Err(4));
    assert_eq!(producer.free_slots(), 0);
    assert!(!consumer.is_empty());
    assert_eq!(pop_all(&mut consumer), vec![0, 1, 2, 3]);
    assert!(consumer.is_empty());
    assert_eq!(producer.free_slots(), 4);
}

#[test]
fn indices_wrap_around_the_slots_many_times() {
    // (capacity, items per round): rounds that do and do not divide the capacity.
    let cases = [(1, 1), (2, 1), (4, 3), (8, 5), (8, 8)];
    for (capacity, round_items) in cases {
        let (mut producer, mut consumer) = ring(capacity);
        let mut next_push = 0u64;
        let mut next_pop = 0u64;
        for _ in 0..100 {
            for _ in 0..round_items {
                producer.push(next_push).unwrap();
                next_push += 1;
            }
            for value in pop_all(&mut consumer) {
                assert_eq!(value, next_pop, "capacity {capacity}");
                next_pop += 1;
            }
        }
        assert_eq!(next_pop, 100 * round_items as u64);
    }
}

#[test]
fn push_from_moves_what_fits_and_leaves_the_rest() {
    let (mut producer, mut consumer) = ring(8);
    let mut source: VecDeque<u32> = (0..20).collect();
    assert_eq!(producer.push_from(&mut source), 8);
    assert_eq!(source.front(), Some(&8));
    assert_eq!(producer.push_from(&mut source), 0, "ring is full");
    assert_eq!(source.len(), 12);

    let mut taken = Vec::new();
    assert_eq!(consumer.drain(3, |value| taken.push(value)), 3);
    assert_eq!(producer.push_from(&mut source), 3);
    assert_eq!(source.len(), 9);
    assert_eq!(producer.push_from(&mut VecDeque::new()), 0);

    while !source.is_empty() || !consumer.is_empty() {
        consumer.drain(usize::MAX, |value| taken.push(value));
        producer.push_from(&mut source);
    }
    assert_eq!(taken, (0..20).collect::<Vec<_>>());
}

#[test]
fn drain_takes_at_most_max() {
    // (items in the ring, max, expected taken)
    let cases = [
        (0, 4, 0),
        (5, 0, 0),
        (5, 3, 3),
        (5, 5, 5),
        (5, 9, 5),
        (8, 100, 8),
    ];
    for (items, max, expected) in cases {
        let (mut producer, mut consumer) = ring(8);
        for value in 0..items {
            producer.push(value).unwrap();
        }
        let mut taken = Vec::new();
        assert_eq!(consumer.drain(max, |value| taken.push(value)), expected);
        assert_eq!(taken, (0..expected).collect::<Vec<_>>());
        assert_eq!(producer.free_slots(), 8 - items + expected);
    }
}

/// Counts its drops in a shared counter.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn every_item_is_dropped_exactly_once() {
    // (pushed, popped before the ring is dropped), with wrap-around in the middle.
    let cases = [(0, 0), (3, 0), (3, 3), (8, 2), (13, 9)];
    for (pushed, popped) in cases {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut producer, mut consumer) = ring(8);
        let mut source: VecDeque<_> = (0..pushed).map(|_| DropCounter(drops.clone())).collect();
        let mut popped_so_far = 0;
        while !source.is_empty() {
            producer.push_from(&mut source);
            while popped_so_far < popped && consumer.pop().is_some() {
                popped_so_far += 1;
            }
            if producer.free_slots() == 0 && !source.is_empty() {
                break;
            }
        }
        let left = source.len();
        drop(source);
        assert_eq!(drops.load(Ordering::SeqCst), popped_so_far + left);
        drop(producer);
        drop(consumer);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            pushed,
            "case {pushed}/{popped}"
        );
    }
}

#[test]
fn a_panicking_drain_callback_drops_nothing_twice() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (mut producer, mut consumer) = ring(8);
    for _ in 0..5 {
        assert!(producer.push(DropCounter(drops.clone())).is_ok());
    }
    let mut seen = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        consumer.drain(5, |item| {
            seen += 1;
            if seen == 2 {
                panic!("callback fails on the second item");
            }
            drop(item);
        })
    }));
    assert!(result.is_err());
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    drop(consumer);
    drop(producer);
    assert_eq!(drops.load(Ordering::SeqCst), 5);
}

#[test]
fn halves_are_send() {
    fn is_send<T: Send>() {}
    is_send::<Producer<Vec<u8>>>();
    is_send::<Consumer<Vec<u8>>>();
}

/// Spins briefly, then yields: the test machine may have fewer cores than threads.
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        thread::yield_now();
    }
}

/// Moves `count` sequence numbers from one thread to another and checks they arrive
/// exactly once, in order. Alternates `push` and `push_from`, `pop` and `drain`.
fn transfer_in_order(count: u64, capacity: usize, batch_items: usize) {
    let (mut producer, mut consumer) = ring::<u64>(capacity);
    let sender = thread::spawn(move || {
        let mut next = 0u64;
        let mut batch = VecDeque::with_capacity(batch_items);
        let mut spins = 0;
        let mut single = true;
        while next < count {
            single = !single;
            if single {
                match producer.push(next) {
                    Ok(()) => {
                        next += 1;
                        spins = 0;
                    }
                    Err(_) => backoff(&mut spins),
                }
                continue;
            }
            while batch.len() < batch_items && next + (batch.len() as u64) < count {
                batch.push_back(next + batch.len() as u64);
            }
            let moved = producer.push_from(&mut batch);
            next += moved as u64;
            batch.clear();
            if moved == 0 {
                backoff(&mut spins);
            } else {
                spins = 0;
            }
        }
    });
    let mut expected = 0u64;
    let mut spins = 0;
    let mut single = true;
    while expected < count {
        single = !single;
        let taken = if single {
            consumer.pop().map_or(0, |value| {
                assert_eq!(value, expected);
                expected += 1;
                1
            })
        } else {
            consumer.drain(batch_items, |value| {
                assert_eq!(value, expected);
                expected += 1;
            })
        };
        if taken == 0 {
            backoff(&mut spins);
        } else {
            spins = 0;
        }
    }
    sender.join().unwrap();
    assert!(consumer.is_empty());
}

#[test]
fn two_threads_move_every_value_once_in_order() {
    let count = if cfg!(debug_assertions) {
        1_000_000
    } else {
        10_000_000
    };
    transfer_in_order(count, 64, 16);
}

/// Moves `count` items from a thread on `source_core` to one on `target_core`,
/// either one `push` per item or `push_from` batches of `batch_items`; returns
/// items per second.
fn throughput_items_per_s(count: u64, batch_items: usize, cores: &[core_affinity::CoreId]) -> f64 {
    let (mut producer, mut consumer) = ring::<u64>(1024);
    let source_core = cores.first().copied();
    let target_core = cores.get(1).copied();
    let started = Instant::now();
    let sender = thread::spawn(move || {
        if let Some(core) = source_core {
            core_affinity::set_for_current(core);
        }
        let mut next = 0u64;
        let mut batch = VecDeque::with_capacity(batch_items);
        while next < count {
            if batch_items == 1 {
                if producer.push(next).is_ok() {
                    next += 1;
                } else {
                    thread::yield_now();
                }
                continue;
            }
            while batch.len() < batch_items {
                batch.push_back(next + batch.len() as u64);
            }
            let moved = producer.push_from(&mut batch);
            next += moved as u64;
            if moved == 0 {
                thread::yield_now();
            }
        }
    });
    if let Some(core) = target_core {
        core_affinity::set_for_current(core);
    }
    let mut received = 0u64;
    let mut sum = 0u64;
    while received < count {
        let taken = consumer.drain(batch_items.max(64), |value| sum = sum.wrapping_add(value));
        received += taken as u64;
        if taken == 0 {
            thread::yield_now();
        }
    }
    sender.join().unwrap();
    let elapsed_s = started.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    count as f64 / elapsed_s
}

/// Not a benchmark (those live in `bench`): a quick figure printed with
/// `--nocapture`, never asserted on.
#[test]
fn throughput_between_two_pinned_threads() {
    let count = if cfg!(debug_assertions) {
        1_000_000
    } else {
        5_000_000
    };
    // The harness runs each test on its own thread, so pinning it is harmless.
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for (label, batch_items) in [("push", 1), ("push_from x64", 64)] {
        let rates: Vec<f64> = (0..3)
            .map(|_| throughput_items_per_s(count, batch_items, &cores))
            .collect();
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "ring throughput {label}: median {:.1} M items/s over {} runs of {count} items \
             (runs {:?} M/s), cores {:?}",
            sorted[1] / 1e6,
            rates.len(),
            rates
                .iter()
                .map(|rate| (rate / 1e6).round())
                .collect::<Vec<_>>(),
            cores.iter().take(2).map(|core| core.id).collect::<Vec<_>>(),
        );
    }
}

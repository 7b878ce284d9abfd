//! The bounded single-producer/single-consumer ring that carries events between
//! two shards: one ring per ordered pair of shards (`source` -> `target`).
//!
//! It is separate from the executors and the channels built on it because it is the
//! only place where two cores share memory on the data path; everything here is
//! model-checked with loom (`engine/tests/loom_ring.rs`, run by `scripts/test`).
//!
//! # Layout and ownership
//!
//! `Shared` holds `slots` (a power of two, `mask = capacity - 1`) and two counters
//! that only ever grow (wrapping): `tail`, the number of items ever published, is
//! written only by the [`Producer`]; `head`, the number of items ever taken, is
//! written only by the [`Consumer`]. Item `i` lives in `slots[i & mask]`, and the
//! ring holds `tail - head` items, between 0 and `capacity`. Slots in
//! `head..tail` are initialised and belong to the consumer; the others are
//! uninitialised and belong to the producer. `head` and `tail` sit on separate
//! cache lines (`CachePadded`) so the two cores never write the same line.
//!
//! Each side keeps its own counter in a plain field (it is the only writer) and a
//! cached copy of the other side's counter. The producer re-reads `head` only when
//! the cache says the ring is full, the consumer re-reads `tail` only when the cache
//! says it is empty. In the steady state a push or a batch touches the remote
//! counter's cache line not at all, and its own line once, for the publishing store.
//!
//! # Memory ordering
//!
//! - Producer: writes the slots, then `tail.store(Release)`. Consumer: reads
//!   `tail.load(Acquire)`, then reads the slots. The Release/Acquire pair makes
//!   the slot writes happen before the reads, so the consumer never sees a slot
//!   before its value.
//! - Consumer: reads (moves out of) the slots, then `head.store(Release)`.
//!   Producer: `head.load(Acquire)`, then overwrites the slots. The pair makes the
//!   consumer's read of a slot happen before the producer reuses it.
//! - Nothing else is shared, so nothing stronger is needed. A stale cached counter
//!   only makes a side see less room or fewer items than there are, never more:
//!   counters only grow, and each side's view of the other's counter lags behind.
//! - Batches ([`Producer::push_from`], [`Consumer::drain`]) write or read many slots
//!   under one store of the counter: the argument above covers every slot
//!   sequenced before that store.
//! - [`Consumer::is_empty`] is a fresh Acquire load of `tail`, for the parking
//!   re-check in `doorbell`, where a SeqCst fence sequenced before it gives the
//!   Dekker guarantee (see that module).
//!
//! # Lazy buffer
//!
//! A ring's slot buffer is allocated by the producer on its first push, not when
//! the ring is made: a runtime of N shards has N(N-1) rings, and most pairs of
//! shards of a real dataflow never talk, so memory grows with the pairs that do.
//! The producer stores the buffer's address (`slots`, Release) before it writes a
//! slot, and publishes the slot with its Release store of `tail`; a consumer that
//! sees an item (Acquire load of `tail`) therefore sees the address, which it
//! loads once and caches. The check on the data path is one test of a cached,
//! non-null pointer per batch; no atomic is added.
//!
//! # Drop
//!
//! The consumer's own `head` field is the truth; the shared `head` is what it has
//! published. A `Consumer` publishes its `head` when dropped, so if the callback of
//! [`Consumer::drain`] panics after items were moved out, they are not dropped a
//! second time. When both halves are gone, `Shared` drops the items in
//! `head..tail` exactly once.

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr;

use crossbeam_utils::CachePadded;

use crate::sync::{Arc, AtomicPtr, AtomicUsize, Ordering, UnsafeCell};

/// The largest capacity a ring accepts, in items: a bound on the memory one pair
/// of shards can pin (with 64 cores there are 4032 rings).
pub const CAPACITY_ITEMS_MAX: usize = 1 << 20;

/// Creates a ring of `capacity` items, rounded up to a power of two.
///
/// # Panics
///
/// If `capacity` is 0 or above [`CAPACITY_ITEMS_MAX`].
pub fn ring<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "ring capacity must be positive");
    assert!(
        capacity <= CAPACITY_ITEMS_MAX,
        "ring capacity {capacity} above {CAPACITY_ITEMS_MAX}"
    );
    let capacity = capacity.next_power_of_two();
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots: AtomicPtr::new(ptr::null_mut()),
        mask: capacity - 1,
        _items: PhantomData,
    });
    let producer = Producer {
        shared: shared.clone(),
        slots: ptr::null(),
        tail: 0,
        head_cached: 0,
    };
    let consumer = Consumer {
        shared,
        slots: ptr::null(),
        head: 0,
        tail_cached: 0,
    };
    (producer, consumer)
}

struct Shared<T> {
    /// Items taken so far (wrapping); stored only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Items published so far (wrapping); stored only by the producer.
    tail: CachePadded<AtomicUsize>,
    /// The slot buffer, `capacity` cells, allocated by the producer's first push
    /// (null until then); freed by `Drop`.
    slots: AtomicPtr<Cell<T>>,
    mask: usize,
    _items: PhantomData<T>,
}

type Cell<T> = UnsafeCell<MaybeUninit<T>>;

impl<T> Shared<T> {
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// A fresh slot buffer of `capacity` cells, as a raw pointer `Drop` frees.
    fn allocate(&self) -> *mut Cell<T> {
        let cells: Box<[Cell<T>]> = (0..self.capacity())
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect();
        Box::into_raw(cells).cast::<Cell<T>>()
    }
}

/// The cell of item `index` in a buffer of `mask + 1` cells.
///
/// # Safety
///
/// `slots` is the ring's non-null buffer.
#[inline]
unsafe fn cell<'a, T>(slots: *const Cell<T>, mask: usize, index: usize) -> &'a Cell<T> {
    // SAFETY: `index & mask` is below the buffer's length, and the buffer lives
    // as long as `Shared`, which both halves keep alive.
    unsafe { &*slots.add(index & mask) }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Both halves are gone; the Arc's last drop synchronised with them. The
        // Acquire loads say the same thing again, locally.
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        let slots = self.slots.load(Ordering::Acquire);
        debug_assert!(tail.wrapping_sub(head) <= self.capacity());
        if slots.is_null() {
            debug_assert_eq!(head, tail, "items without a buffer");
            return;
        }
        let mut index = head;
        while index != tail {
            // SAFETY: slots in head..tail hold initialised items that no one has
            // moved out (the consumer published every item it took), and we have
            // exclusive access: this is the last reference.
            unsafe { cell(slots, self.mask, index) }
                .with_mut(|slot| unsafe { (*slot).assume_init_drop() });
            index = index.wrapping_add(1);
        }
        // SAFETY: `slots` came from `allocate` (a boxed slice of `capacity` cells)
        // and is freed only here, once; the items in it were dropped above.
        drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(slots, self.capacity())) });
    }
}

/// The sending half of a ring, owned by the source shard. `Send`, not `Sync`.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// The slot buffer once allocated (null before the first push).
    slots: *const Cell<T>,
    /// The producer's own count of published items; equals `shared.tail`
    /// between calls.
    tail: usize,
    /// The last `shared.head` seen; at most the true value.
    head_cached: usize,
}

// SAFETY: the producer moves `T` values to another thread (hence `T: Send`) and
// touches only the slots it owns by the protocol in the module header; it holds no
// reference that another thread could use through a `&Producer`.
unsafe impl<T: Send> Send for Producer<T> {}

impl<T> Producer<T> {
    /// The ring's capacity in items (a power of two).
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Free slots, re-reading the consumer's progress.
    pub fn free_slots(&mut self) -> usize {
        self.head_cached = self.shared.head.load(Ordering::Acquire);
        self.free_slots_cached()
    }

    fn free_slots_cached(&self) -> usize {
        let used = self.tail.wrapping_sub(self.head_cached);
        debug_assert!(used <= self.capacity());
        self.capacity() - used
    }

    /// At least `wanted` free slots if there are, re-reading `head` only if the
    /// cached value says there are not.
    fn free_slots_for(&mut self, wanted: usize) -> usize {
        let free = self.free_slots_cached();
        if free >= wanted {
            return free;
        }
        self.free_slots()
    }

    /// Writes `value` at `self.tail` without publishing it.
    ///
    /// # Safety
    ///
    /// The caller has checked that there is a free slot.
    unsafe fn write(&mut self, value: T) {
        debug_assert!(!self.slots.is_null(), "write before allocation");
        // SAFETY: the buffer is allocated (the caller checked for room after
        // `ensure_slots`). The slot at `tail` is outside head..tail, so it belongs
        // to the producer; the Acquire load of `head` that showed it free ordered
        // the consumer's last read of it before this write.
        unsafe { cell(self.slots, self.shared.mask, self.tail) }.with_mut(|slot| unsafe {
            (*slot).write(value);
        });
        self.tail = self.tail.wrapping_add(1);
    }

    /// Allocates the slot buffer on the first push and announces it to the
    /// consumer (the Release store; the consumer sees it through `tail`).
    #[inline]
    fn ensure_slots(&mut self) {
        if self.slots.is_null() {
            let slots = self.shared.allocate();
            self.shared.slots.store(slots, Ordering::Release);
            self.slots = slots;
        }
    }

    /// Pushes one item and publishes it at once, or gives it back if the ring is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.free_slots_for(1) == 0 {
            return Err(value);
        }
        self.ensure_slots();
        // SAFETY: checked just above that a slot is free.
        unsafe { self.write(value) };
        self.shared.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Moves as many items as fit from the front of `source` and publishes them
    /// with a single store. Returns how many moved; the rest stay in `source`.
    pub fn push_from(&mut self, source: &mut VecDeque<T>) -> usize {
        if source.is_empty() {
            return 0;
        }
        let count = self.free_slots_for(source.len()).min(source.len());
        if count > 0 {
            self.ensure_slots();
        }
        for value in source.drain(..count) {
            // SAFETY: `count` is at most the number of free slots.
            unsafe { self.write(value) };
        }
        if count > 0 {
            self.shared.tail.store(self.tail, Ordering::Release);
        }
        count
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .field("tail", &self.tail)
            .field("head_cached", &self.head_cached)
            .finish()
    }
}

/// The receiving half of a ring, owned by the target shard. `Send`, not `Sync`.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// The slot buffer, loaded when the first item is seen (null before).
    slots: *const Cell<T>,
    /// The consumer's own count of taken items; published to `shared.head` at the
    /// end of each call and on drop.
    head: usize,
    /// The last `shared.tail` seen; at most the true value.
    tail_cached: usize,
}

// SAFETY: the consumer receives `T` values from another thread (hence `T: Send`)
// and touches only the slots it owns by the protocol in the module header; its one
// `&self` method, `is_empty`, reads only atomics and its own field.
unsafe impl<T: Send> Send for Consumer<T> {}

impl<T> Consumer<T> {
    /// The ring's capacity in items (a power of two).
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the ring is empty, with a fresh Acquire load of `tail`. For the
    /// re-check before parking; the data path uses `pop` or `drain`.
    pub fn is_empty(&self) -> bool {
        self.shared.tail.load(Ordering::Acquire) == self.head
    }

    /// At least `wanted` available items if there are, re-reading `tail` only if
    /// the cached value says there are not.
    fn available_for(&mut self, wanted: usize) -> usize {
        let available = self.tail_cached.wrapping_sub(self.head);
        if available >= wanted {
            return available;
        }
        self.tail_cached = self.shared.tail.load(Ordering::Acquire);
        let available = self.tail_cached.wrapping_sub(self.head);
        debug_assert!(available <= self.capacity());
        if available > 0 && self.slots.is_null() {
            // The producer stored the buffer before the `tail` just loaded.
            self.slots = self.shared.slots.load(Ordering::Acquire);
            debug_assert!(!self.slots.is_null(), "items without a buffer");
        }
        available
    }

    /// Moves the item at `self.head` out without publishing the slot as free.
    ///
    /// # Safety
    ///
    /// The caller has checked that an item is available.
    unsafe fn read(&mut self) -> T {
        // SAFETY: the slot at `head` is inside head..tail, so it is initialised
        // and belongs to the consumer; the Acquire load of `tail` that showed it
        // ordered the producer's write before this read. Advancing `head` right
        // after means it is never read twice.
        let value = unsafe { cell(self.slots, self.shared.mask, self.head) }
            .with(|slot| unsafe { (*slot).assume_init_read() });
        self.head = self.head.wrapping_add(1);
        value
    }

    /// Takes one item, freeing its slot at once.
    pub fn pop(&mut self) -> Option<T> {
        if self.available_for(1) == 0 {
            return None;
        }
        // SAFETY: checked just above that an item is available.
        let value = unsafe { self.read() };
        self.shared.head.store(self.head, Ordering::Release);
        Some(value)
    }

    /// Hands up to `max` items to `f` in order and frees their slots with a single
    /// store at the end. Returns how many were taken.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let count = self.available_for(max).min(max);
        for _ in 0..count {
            // SAFETY: `count` is at most the number of available items. If `f`
            // panics, `head` already counts the items moved out, and `Drop`
            // publishes it.
            let value = unsafe { self.read() };
            f(value);
        }
        if count > 0 {
            self.shared.head.store(self.head, Ordering::Release);
        }
        count
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        // Publishes items taken by a `drain` whose callback panicked, so that
        // `Shared::drop` does not drop them again.
        self.shared.head.store(self.head, Ordering::Release);
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .field("head", &self.head)
            .field("tail_cached", &self.tail_cached)
            .finish()
    }
}

/// Neither half is `Sync`: each belongs to exactly one shard.
///
/// ```compile_fail
/// fn is_sync<T: Sync>() {}
/// is_sync::<dirigo_engine::ring::Producer<u64>>();
/// ```
///
/// ```compile_fail
/// fn is_sync<T: Sync>() {}
/// is_sync::<dirigo_engine::ring::Consumer<u64>>();
/// ```
///
/// ```compile_fail
/// fn is_clone<T: Clone>() {}
/// is_clone::<dirigo_engine::ring::Producer<u64>>();
/// ```
#[cfg(doctest)]
pub struct NotSyncNotClone;

#[cfg(all(test, not(loom)))]
mod tests;

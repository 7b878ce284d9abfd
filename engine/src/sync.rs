//! The synchronization primitives the engine's lock-free code is written against.
//!
//! Code with atomics (`ring`, `doorbell`) imports `Arc`, `Mutex`, the atomics,
//! `fence`, `UnsafeCell` and `thread` from here, never from `std` directly. Under
//! `--cfg loom` these are loom's instrumented versions, so `engine/tests/loom_ring.rs`
//! explores every interleaving and every weak-memory outcome the C++ model allows;
//! in a normal build they are the `std` types at zero cost. The pattern is tokio's
//! `src/loom` facade.
//!
//! Only this module looks at `cfg(loom)`: everything else compiles the same way
//! under both configurations, so the model checks the code that ships.
//!
//! `std::cell::UnsafeCell` hands out raw pointers with `get()`, which loom cannot
//! observe. Loom's `UnsafeCell` instead lends the pointer to a closure (`with`,
//! `with_mut`) so it can check that no read races a write. The `std` build wraps
//! `std::cell::UnsafeCell` in the same closure API, so both builds share one source.

#[cfg(loom)]
pub use loom::{
    cell::UnsafeCell,
    sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicUsize, Ordering},
    sync::{Arc, Mutex, MutexGuard},
    thread,
};

#[cfg(not(loom))]
pub use std::{
    sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicUsize, Ordering},
    sync::{Arc, Mutex, MutexGuard},
    thread,
};

#[cfg(not(loom))]
pub use self::std_cell::UnsafeCell;

#[cfg(not(loom))]
mod std_cell {
    /// `std::cell::UnsafeCell` behind loom's closure API; compiles to a plain `get()`.
    #[derive(Debug)]
    #[repr(transparent)]
    pub struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub const fn new(data: T) -> Self {
            Self(std::cell::UnsafeCell::new(data))
        }

        /// Lends a pointer for reading. The caller upholds the aliasing rules.
        #[inline(always)]
        pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        /// Lends a pointer for writing. The caller upholds the aliasing rules.
        #[inline(always)]
        pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

//! Time as the runtime sees it: nanoseconds on one monotonic clock shared by every
//! shard of the process, so a time stamped on one shard can be compared on another
//! (migration pauses, queueing delay of forwarded messages).
//!
//! A shard reads the clock once per pass and turn, and within a turn only as often
//! as its messages' pace needs (`clock_gap` in `runtime/shard.rs`: after each one of
//! an actor whose messages are slow, every 16 of one whose messages are tiny), so
//! the per-message cost of tiny messages stays a subtraction. Tests use `Clock::manual`, a
//! clock that moves only when told to, so scheduling can be checked without timing.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the process's clock epoch (monotonic).
#[inline]
pub fn monotonic_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The clock a shard reads.
#[derive(Clone)]
pub enum Clock {
    Monotonic,
    Manual(Rc<Cell<u64>>),
}

impl Clock {
    pub fn manual(start_ns: u64) -> (Clock, Rc<Cell<u64>>) {
        let cell = Rc::new(Cell::new(start_ns));
        (Clock::Manual(cell.clone()), cell)
    }

    #[inline]
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Monotonic => monotonic_ns(),
            Clock::Manual(cell) => cell.get(),
        }
    }
}

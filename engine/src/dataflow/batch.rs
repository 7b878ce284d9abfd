//! `Batch`: a `Vec<T>` with its element type erased, the one place where typed
//! streams meet the runtime's single message type.
//!
//! A dataflow's edges are typed (`Stream<Bid>`), but the runtime moves one message
//! type (`DataMsg`) for every job. A batch travels as the raw parts of its vector
//! plus the `TypeId` of its elements; the receiving stage, which knows its input
//! type statically, takes the vector back with [`Batch::into_vec`], which checks
//! the type. Nothing is copied or allocated on the way: a batch moves by ownership
//! between shards, as the vector would.

use std::any::{type_name, TypeId};
use std::mem::ManuallyDrop;

/// A type-erased `Vec<T>` of `Send` records.
pub struct Batch {
    ptr: *mut u8,
    len: usize,
    capacity: usize,
    type_id: TypeId,
    type_name: &'static str,
    /// Rebuilds and drops the `Vec<T>`; called when a batch is dropped unread.
    drop_vec: unsafe fn(*mut u8, usize, usize),
}

// SAFETY: a `Batch` is only built from a `Vec<T>` with `T: Send`, and owns it
// exclusively: sending it to another thread sends the vector.
unsafe impl Send for Batch {}

unsafe fn drop_vec<T>(ptr: *mut u8, len: usize, capacity: usize) {
    // SAFETY: the caller passes the parts taken from a `Vec<T>` in `Batch::new`,
    // exactly once (`Batch::drop` or never, after `into_vec`).
    drop(unsafe { Vec::from_raw_parts(ptr as *mut T, len, capacity) });
}

impl Batch {
    pub fn new<T: Send + 'static>(records: Vec<T>) -> Batch {
        let mut records = ManuallyDrop::new(records);
        Batch {
            ptr: records.as_mut_ptr() as *mut u8,
            len: records.len(),
            capacity: records.capacity(),
            type_id: TypeId::of::<T>(),
            type_name: type_name::<T>(),
            drop_vec: drop_vec::<T>,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The records, as the vector they were sent as. Panics if `T` is not their
    /// type: a plan whose edges do not match is a bug in the graph builder.
    pub fn into_vec<T: 'static>(self) -> Vec<T> {
        assert!(
            self.type_id == TypeId::of::<T>(),
            "a batch of {} taken as {}",
            self.type_name,
            type_name::<T>()
        );
        let this = ManuallyDrop::new(self);
        // SAFETY: the parts come from a `Vec<T>` (same `TypeId`), and `this` is never
        // dropped, so the vector is rebuilt exactly once.
        unsafe { Vec::from_raw_parts(this.ptr as *mut T, this.len, this.capacity) }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: the parts and the function come from the same `Vec<T>`; a batch
        // taken by `into_vec` is never dropped.
        unsafe { (self.drop_vec)(self.ptr, self.len, self.capacity) }
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batch<{}>[{}]", self.type_name, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_batch_gives_its_vector_back_and_drops_what_it_owns() {
        let batch = Batch::new(vec![String::from("a"), String::from("b")]);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.into_vec::<String>(), vec!["a", "b"]);

        // Dropped unread: each element is dropped exactly once.
        let marker = Arc::new(());
        drop(Batch::new(vec![
            marker.clone(),
            marker.clone(),
            marker.clone(),
        ]));
        assert_eq!(Arc::strong_count(&marker), 1);
    }

    #[test]
    #[should_panic(expected = "taken as")]
    fn the_wrong_type_is_refused() {
        let _ = Batch::new(vec![1u32]).into_vec::<u64>();
    }
}

//! `Batch`: a `Vec<T>` with its element type erased, the one place where typed
//! streams meet the runtime's single message type.
//!
//! A dataflow's edges are typed (`Stream<Bid>`), but the runtime moves one message
//! type (`DataMsg`) for every job. A batch travels as the raw parts of its vector
//! plus the `TypeId` of its elements; the receiving stage, which knows its input
//! type statically, takes the vector back with [`Batch::into_vec`], which checks
//! the type. Nothing is copied or allocated on the way: a batch moves by ownership
//! between shards, as the vector would.
//!
//! Between nodes a batch crosses encoded: the gateway writes its records as one
//! rkyv archive of the vector ([`Data`] says every record type can be), by a
//! function the batch took when it was made, and the batch on the other node
//! holds those bytes; `into_vec` on the receiving stage checks the type by
//! name (`type_name`, which is meant for messages, not identity: nodes
//! are expected to run the same build, which nothing checks yet), checks
//! the archive (so a mismatch is refused, never misread) and reads them
//! back.

use std::any::{type_name, TypeId};
use std::mem::ManuallyDrop;

use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::{Error as RkyvError, Fallible, Strategy};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::{Allocator, Writer};
use rkyv::util::AlignedVec;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Deserialize, Place, Serialize};

/// What a record type must be to travel on an edge: owned, cloneable (a stage
/// with several consumers gives each its copy), sendable between shards, and
/// rkyv-encodable (derive `rkyv::Archive`, `rkyv::Serialize` and
/// `rkyv::Deserialize`), so that a batch of it crosses nodes. Implemented for
/// every such type; nothing to write by hand.
pub trait Data: Clone + Send + 'static {
    /// `records` as one rkyv archive of a `Vec<Self>`.
    #[doc(hidden)]
    fn encode_records(records: &[Self]) -> Result<Vec<u8>, RkyvError>;
    /// The records of an archive `encode_records` wrote (checked first;
    /// `bytes` aligned for the archive).
    #[doc(hidden)]
    fn decode_records(bytes: &[u8]) -> Result<Vec<Self>, RkyvError>;
}

impl<T> Data for T
where
    T: Clone + Send + 'static + Archive,
    T: for<'a> Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, RkyvError>>,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, RkyvError>>
        + Deserialize<T, Strategy<Pool, RkyvError>>,
{
    fn encode_records(records: &[T]) -> Result<Vec<u8>, RkyvError> {
        rkyv::api::high::to_bytes_in::<_, RkyvError>(&SliceAsVec(records), Vec::new())
    }

    fn decode_records(bytes: &[u8]) -> Result<Vec<T>, RkyvError> {
        rkyv::from_bytes::<Vec<T>, RkyvError>(bytes)
    }
}

/// A borrowed slice archived as a `Vec` would be (so that encoding a batch
/// neither takes nor copies its records).
struct SliceAsVec<'a, T>(&'a [T]);

impl<T: Archive> Archive for SliceAsVec<'_, T> {
    type Archived = ArchivedVec<T::Archived>;
    type Resolver = VecResolver;

    fn resolve(&self, resolver: VecResolver, out: Place<Self::Archived>) {
        ArchivedVec::resolve_from_len(self.0.len(), resolver, out);
    }
}

impl<T, S> Serialize<S> for SliceAsVec<'_, T>
where
    T: Serialize<S>,
    S: Fallible + Allocator + Writer + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::serialize_from_slice(self.0, serializer)
    }
}

/// Where an encoded batch's archive is read from: rkyv reads an archive
/// only from memory aligned for it.
const RECORDS_ALIGN: usize = 16;

/// A type-erased `Vec<T>` of [`Data`] records: held as the vector, or as
/// the encoding of one that came from another node.
pub struct Batch(Repr);

enum Repr {
    Held(Held),
    /// Records from another node: an archive of a `Vec` of `type_name`s
    /// (or, when their node could not encode them, why).
    Encoded {
        type_name: String,
        len: usize,
        bytes: Result<Vec<u8>, String>,
    },
}

/// A vector's parts, its element type, and what drops and encodes it.
struct Held {
    ptr: *mut u8,
    len: usize,
    capacity: usize,
    type_id: TypeId,
    type_name: &'static str,
    /// Rebuilds and drops the `Vec<T>`; called when a batch is dropped unread.
    drop_vec: unsafe fn(*mut u8, usize, usize),
    /// `T::encode_records` over the parts.
    encode: unsafe fn(*const u8, usize) -> Result<Vec<u8>, RkyvError>,
}

// SAFETY: `Held` is only built from a `Vec<T>` with `T: Send` (`Batch::new`),
// and owns it exclusively: sending it to another thread sends the vector.
unsafe impl Send for Held {}

unsafe fn drop_vec<T>(ptr: *mut u8, len: usize, capacity: usize) {
    // SAFETY: the caller passes the parts taken from a `Vec<T>` in `Batch::new`,
    // exactly once (`Held::drop` or never, after `into_vec`).
    drop(unsafe { Vec::from_raw_parts(ptr as *mut T, len, capacity) });
}

unsafe fn encode<T: Data>(ptr: *const u8, len: usize) -> Result<Vec<u8>, RkyvError> {
    // SAFETY: the caller passes the pointer and length of a live `Vec<T>`
    // its `Held` owns, and drops that only after the slice is read.
    T::encode_records(unsafe { std::slice::from_raw_parts(ptr as *const T, len) })
}

impl Batch {
    pub fn new<T: Data>(records: Vec<T>) -> Batch {
        let mut records = ManuallyDrop::new(records);
        Batch(Repr::Held(Held {
            ptr: records.as_mut_ptr() as *mut u8,
            len: records.len(),
            capacity: records.capacity(),
            type_id: TypeId::of::<T>(),
            type_name: type_name::<T>(),
            drop_vec: drop_vec::<T>,
            encode: encode::<T>,
        }))
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Held(held) => held.len,
            Repr::Encoded { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the records came encoded from another node.
    pub fn crossed(&self) -> bool {
        matches!(self.0, Repr::Encoded { .. })
    }

    /// The name of the records' type.
    pub fn type_name(&self) -> &str {
        match &self.0 {
            Repr::Held(held) => held.type_name,
            Repr::Encoded { type_name, .. } => type_name,
        }
    }

    /// The records as one rkyv archive, with their type's name and count,
    /// to cross nodes (`Batch::from_encoded` on the other side); an error
    /// if they could not be encoded. A batch that came encoded gives its
    /// bytes back as they came.
    pub(crate) fn encode(self) -> (String, usize, Result<Vec<u8>, String>) {
        match self.0 {
            Repr::Held(held) => {
                // SAFETY: `held` owns the vector its parts come from, and
                // is dropped (the vector with it) only after this.
                let bytes = unsafe { (held.encode)(held.ptr, held.len) };
                let bytes = bytes.map_err(|e| e.to_string());
                (held.type_name.to_string(), held.len, bytes)
            }
            Repr::Encoded {
                type_name,
                len,
                bytes,
            } => (type_name, len, bytes),
        }
    }

    /// A batch of `len` records of type `type_name` that came encoded from
    /// another node (`Batch::encode`).
    pub(crate) fn from_encoded(
        type_name: String,
        len: usize,
        bytes: Result<Vec<u8>, String>,
    ) -> Batch {
        Batch(Repr::Encoded {
            type_name,
            len,
            bytes,
        })
    }

    /// The records, as the vector they were sent as. Panics if `T` is not their
    /// type: a plan whose edges do not match is a bug in the graph builder; and
    /// if they came from another node and cannot be read (the job fails,
    /// naming the stage).
    pub fn into_vec<T: Data>(self) -> Vec<T> {
        match self.0 {
            Repr::Held(held) => {
                assert!(
                    held.type_id == TypeId::of::<T>(),
                    "a batch of {} taken as {}",
                    held.type_name,
                    type_name::<T>()
                );
                let held = ManuallyDrop::new(held);
                // SAFETY: the parts come from a `Vec<T>` (same `TypeId`), and
                // `held` is never dropped, so the vector is rebuilt exactly once.
                unsafe { Vec::from_raw_parts(held.ptr as *mut T, held.len, held.capacity) }
            }
            Repr::Encoded {
                type_name: name,
                len,
                bytes,
            } => {
                assert!(
                    name == type_name::<T>(),
                    "a batch of {name} taken as {}",
                    type_name::<T>()
                );
                let bytes = bytes.unwrap_or_else(|e| {
                    panic!("a batch of {len} {name} its node could not encode: {e}")
                });
                let mut aligned = AlignedVec::<RECORDS_ALIGN>::with_capacity(bytes.len());
                aligned.extend_from_slice(&bytes);
                drop(bytes);
                let records = T::decode_records(&aligned).unwrap_or_else(|e| {
                    panic!("a batch of {len} {name} from another node could not be read: {e}")
                });
                assert!(
                    records.len() == len,
                    "a batch of {len} {name} from another node held {}",
                    records.len()
                );
                records
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: the parts and the function come from the same `Vec<T>`; a batch
        // taken by `into_vec` is never dropped.
        unsafe { (self.drop_vec)(self.ptr, self.len, self.capacity) }
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batch<{}>[{}]", self.type_name(), self.len())
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

    /// A batch as it crosses nodes: `encode` on one, `from_encoded` on the
    /// other.
    fn crossed(batch: Batch) -> Batch {
        let (type_name, len, bytes) = batch.encode();
        Batch::from_encoded(type_name, len, bytes)
    }

    #[test]
    fn a_batch_crosses_encoded_and_is_read_back_as_its_type() {
        let records: Vec<(u64, String)> = (0..1_000).map(|i| (i, format!("r{i}"))).collect();
        let batch = crossed(Batch::new(records.clone()));
        assert_eq!(batch.len(), 1_000);
        assert_eq!(batch.type_name(), type_name::<(u64, String)>());
        // Encoded again as it came (a message forwarded on).
        let batch = crossed(batch);
        assert_eq!(batch.into_vec::<(u64, String)>(), records);
        assert!(crossed(Batch::new(Vec::<u8>::new()))
            .into_vec::<u8>()
            .is_empty());
    }

    #[test]
    #[should_panic(expected = "taken as")]
    fn an_encoded_batch_of_another_type_is_refused() {
        let _ = crossed(Batch::new(vec![1u32])).into_vec::<u64>();
    }

    #[test]
    #[should_panic(expected = "could not be read")]
    fn damaged_records_fail_the_stage_that_takes_them() {
        let (type_name, len, bytes) = Batch::new(vec![String::from("abc"); 4]).encode();
        let mut bytes = bytes.unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x7f; // the top byte of the archived length
        let _ = Batch::from_encoded(type_name, len, Ok(bytes)).into_vec::<String>();
    }

    #[test]
    #[should_panic(expected = "a batch of 3 u64 its node could not encode: no room")]
    fn records_their_node_could_not_encode_fail_the_stage_that_takes_them() {
        let batch = Batch::from_encoded("u64".into(), 3, Err("no room".into()));
        let _ = batch.into_vec::<u64>();
    }

    #[test]
    #[should_panic(expected = "held 2")]
    fn a_count_that_does_not_match_its_records_is_refused() {
        let (type_name, _, bytes) = Batch::new(vec![7u64, 8]).encode();
        let _ = Batch::from_encoded(type_name, 3, bytes).into_vec::<u64>();
    }
}

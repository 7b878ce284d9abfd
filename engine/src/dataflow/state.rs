//! Keyed operator state, by key group: what checkpoints write, deactivation
//! saves and restore reads back.
//!
//! A keyed stage's partition keeps its state in a [`KeyGroups<S>`]: one `S` (say
//! the open windows of the keys of that group) per key group of the job, and a
//! bit per group that says whether it changed since the last snapshot. So a
//! checkpoint writes only the groups that changed (incremental), a restore reads
//! back group by group, and moving or splitting a partition moves whole groups.
//! The key groups of a job are fixed when it is created (`Job::key_groups`,
//! default [`super::KEY_GROUPS_DEFAULT`]) and a key's group is
//! `key_group(key, groups)`, the same function that routes it, so an operator
//! keyed like its stage keeps each key's state in the group its records come in
//! on.
//!
//! Event-time timers are kept the same way ([`KeyedTimers`]): per key group,
//! fired in time order by the watermark, snapshotted with the rest.
//!
//! An operator says how its state is kept by implementing
//! `Operator::state` (a required method: forgetting it does not compile); one
//! that keeps nothing answers `None`. What a group holds is encoded by
//! [`GroupState`]: plain framing (lengths, keys, window bounds) around values
//! that are rkyv types ([`Persist`]), each validated with bytecheck when read.
//! The whole encoded group is checksummed by the storage layer, so a flipped bit
//! is found before any of it is decoded.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor::Error as RkyvError;
use rkyv::ser::allocator::{Arena, ArenaHandle};
use rkyv::util::AlignedVec;

use crate::ids::IdMap;

/// A value kept in operator state: an rkyv type, validated when read back.
/// Implemented for every type rkyv can archive, serialize and check.
pub trait Persist: Sized {
    /// Append the value's archived bytes to `out`, prefixed with their length.
    fn persist(&self, out: &mut Vec<u8>);
    /// Read a value `persist` wrote (checked: bad bytes are an error, never a
    /// wrong value or a panic).
    fn restore(bytes: &[u8]) -> Result<Self, String>;
}

thread_local! {
    /// Scratch of `persist`: an aligned buffer and an arena, reused so that
    /// encoding a value allocates nothing in the steady state.
    static SCRATCH: RefCell<(AlignedVec, Arena)> = RefCell::new((AlignedVec::new(), Arena::new()));
    /// Scratch of `restore`: archived bytes must be aligned to be checked.
    static ALIGNED: RefCell<AlignedVec> = RefCell::new(AlignedVec::new());
}

impl<T> Persist for T
where
    T: rkyv::Archive
        + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RkyvError>>,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<HighValidator<'a, RkyvError>>
        + rkyv::Deserialize<T, HighDeserializer<RkyvError>>,
{
    fn persist(&self, out: &mut Vec<u8>) {
        SCRATCH.with(|scratch| {
            let (buffer, arena) = &mut *scratch.borrow_mut();
            let mut writer = std::mem::take(buffer);
            writer.clear();
            let writer = rkyv::api::high::to_bytes_in_with_alloc::<_, _, RkyvError>(
                self,
                writer,
                arena.acquire(),
            )
            .expect("encoding into memory cannot fail");
            put_u32(out, writer.len() as u32);
            out.extend_from_slice(&writer);
            *buffer = writer;
        })
    }

    fn restore(bytes: &[u8]) -> Result<Self, String> {
        ALIGNED.with(|aligned| {
            let mut aligned = aligned.borrow_mut();
            aligned.clear();
            aligned.extend_from_slice(bytes);
            rkyv::from_bytes::<T, RkyvError>(&aligned).map_err(|e| e.to_string())
        })
    }
}

/// What one key group of an operator holds, and how it is written and read.
pub trait GroupState: Default + Send + 'static {
    /// Nothing held: such a group is not written, and restores as `default()`.
    fn is_empty(&self) -> bool;
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

/// An operator's view of its state for the engine: the actor snapshots and
/// restores through it, never knowing what the groups hold.
pub trait Stateful {
    /// Called once, before the first record: the job's key groups.
    fn init(&mut self, key_groups: u32);
    /// Groups changed since `clear_changed`.
    fn changed(&self) -> Vec<u32>;
    fn clear_changed(&mut self);
    /// Mark `group` changed (a reactivated actor that had unsaved changes).
    fn mark_changed(&mut self, group: u32);
    /// Groups that hold something.
    fn non_empty(&self) -> Vec<u32>;
    /// Append the encoding of `group` (nothing for an empty group).
    fn encode_group(&self, group: u32, out: &mut Vec<u8>);
    /// Put back one group as `encode_group` wrote it (empty bytes: empty).
    fn restore(&mut self, group: u32, bytes: &[u8]) -> Result<(), String>;
    /// Take `group` out, leaving it empty: `None` when it holds nothing.
    /// For another partition of the same stage in this process
    /// ([`Stateful::put_group`]). `KeyGroups` moves the group's state as it
    /// is held, without encoding it, so a handoff of hundreds of megabytes
    /// is a few pointers; by default it is encoded.
    fn take_group(&mut self, group: u32) -> Option<MovedGroup> {
        let mut bytes = Vec::new();
        self.encode_group(group, &mut bytes);
        if bytes.is_empty() {
            return None;
        }
        self.restore(group, &[])
            .expect("an empty group always restores");
        Some(MovedGroup::Encoded(bytes))
    }
    /// Put in a group [`Stateful::take_group`] took out of a partition of the
    /// same stage (what `group` held here is dropped).
    fn put_group(&mut self, group: u32, moved: MovedGroup) -> Result<(), String> {
        match moved {
            MovedGroup::Encoded(bytes) => self.restore(group, &bytes),
            MovedGroup::Held { .. } => Err(format!(
                "key group {group}: moved as held from an operator of another kind"
            )),
        }
    }
}

/// One key group's state taken out of a partition to move to another
/// partition of the same stage ([`Stateful::take_group`]).
pub enum MovedGroup {
    /// As the partition held it (`KeyGroups`), and how to encode it should
    /// it cross to another node (as `Stateful::encode_group` would).
    Held {
        state: Box<dyn Any + Send>,
        encode: fn(&(dyn Any + Send), &mut Vec<u8>),
    },
    /// Encoded as `Stateful::encode_group` writes it.
    Encoded(Vec<u8>),
}

impl MovedGroup {
    /// The group encoded (to cross nodes).
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            MovedGroup::Held { state, encode } => {
                let mut bytes = Vec::new();
                encode(&*state, &mut bytes);
                bytes
            }
            MovedGroup::Encoded(bytes) => bytes,
        }
    }
}

/// `MovedGroup::Held`'s encoder for a `KeyGroups<S>`'s group.
fn encode_held<S: GroupState>(state: &(dyn Any + Send), out: &mut Vec<u8>) {
    let state = state
        .downcast_ref::<S>()
        .expect("a held group is encoded by its own kind's encoder");
    if !state.is_empty() {
        state.encode(out);
    }
}

/// Per key group an `S`, and which groups changed since the last snapshot.
pub struct KeyGroups<S> {
    groups: Vec<S>,
    changed: Vec<u64>,
}

impl<S: GroupState> Default for KeyGroups<S> {
    fn default() -> Self {
        KeyGroups {
            groups: Vec::new(),
            changed: Vec::new(),
        }
    }
}

impl<S: GroupState> KeyGroups<S> {
    /// The job's number of key groups (0 before `init`).
    pub fn len(&self) -> u32 {
        self.groups.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The group of `key` (the job's routing function). An operator used on
    /// its own (a unit test), never `init` by an actor, gets the default count.
    #[inline]
    pub fn group_of(&mut self, key: u64) -> u32 {
        if self.groups.is_empty() {
            self.init(super::KEY_GROUPS_DEFAULT);
        }
        super::key_group(key, self.groups.len() as u32)
    }

    /// Group `group` for changing: marks it changed.
    #[inline]
    pub fn get_mut(&mut self, group: u32) -> &mut S {
        self.changed[(group / 64) as usize] |= 1 << (group % 64);
        &mut self.groups[group as usize]
    }

    /// The group of `key`, for changing.
    #[inline]
    pub fn for_key(&mut self, key: u64) -> &mut S {
        let group = self.group_of(key);
        self.get_mut(group)
    }

    pub fn get(&self, group: u32) -> &S {
        &self.groups[group as usize]
    }

    /// Every group that holds something, with its number, unmarked.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &S)> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .map(|(g, s)| (g as u32, s))
    }

    /// Every group that holds something, for changing (each is marked changed).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut S)> {
        let changed = &mut self.changed;
        self.groups
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .map(move |(g, s)| {
                changed[g / 64] |= 1 << (g % 64);
                (g as u32, s)
            })
    }

    fn is_changed(&self, group: u32) -> bool {
        self.changed[(group / 64) as usize] & (1 << (group % 64)) != 0
    }
}

impl<S: GroupState> Stateful for KeyGroups<S> {
    fn init(&mut self, key_groups: u32) {
        if self.groups.len() != key_groups as usize {
            self.groups = (0..key_groups).map(|_| S::default()).collect();
            self.changed = vec![0; (key_groups as usize).div_ceil(64)];
        }
    }

    fn changed(&self) -> Vec<u32> {
        (0..self.groups.len() as u32)
            .filter(|&g| self.is_changed(g))
            .collect()
    }

    fn clear_changed(&mut self) {
        self.changed.iter_mut().for_each(|w| *w = 0);
    }

    fn mark_changed(&mut self, group: u32) {
        if (group as usize) < self.groups.len() {
            self.get_mut(group);
        }
    }

    fn non_empty(&self) -> Vec<u32> {
        self.iter().map(|(g, _)| g).collect()
    }

    fn encode_group(&self, group: u32, out: &mut Vec<u8>) {
        let state = &self.groups[group as usize];
        if !state.is_empty() {
            state.encode(out);
        }
    }

    fn restore(&mut self, group: u32, bytes: &[u8]) -> Result<(), String> {
        let groups = self.len();
        let slot = self
            .groups
            .get_mut(group as usize)
            .ok_or_else(|| format!("key group {group} beyond the job's {groups}"))?;
        *slot = if bytes.is_empty() {
            S::default()
        } else {
            S::decode(bytes).map_err(|e| format!("key group {group}: {e}"))?
        };
        Ok(())
    }

    fn take_group(&mut self, group: u32) -> Option<MovedGroup> {
        let slot = self.groups.get_mut(group as usize)?;
        let taken = std::mem::take(slot);
        (!taken.is_empty()).then(|| MovedGroup::Held {
            state: Box::new(taken),
            encode: encode_held::<S>,
        })
    }

    fn put_group(&mut self, group: u32, moved: MovedGroup) -> Result<(), String> {
        let groups = self.len();
        let slot = self
            .groups
            .get_mut(group as usize)
            .ok_or_else(|| format!("key group {group} beyond the job's {groups}"))?;
        *slot = match moved {
            MovedGroup::Held { state, .. } => *state.downcast::<S>().map_err(|_| {
                format!("key group {group}: moved from an operator of another kind")
            })?,
            MovedGroup::Encoded(bytes) if bytes.is_empty() => S::default(),
            MovedGroup::Encoded(bytes) => {
                S::decode(&bytes).map_err(|e| format!("key group {group}: {e}"))?
            }
        };
        Ok(())
    }
}

/// Encode `groups` of `state` as `(group, bytes)` pairs.
pub(crate) fn encode_groups(state: &dyn Stateful, groups: &[u32]) -> Vec<(u32, Vec<u8>)> {
    groups
        .iter()
        .map(|&g| {
            let mut bytes = Vec::new();
            state.encode_group(g, &mut bytes);
            (g, bytes)
        })
        .collect()
}

/// A table of values by key, one per key group: the common shape of keyed state.
pub type KeyedState<V> = KeyGroups<IdMap<u64, V>>;

// ---- framing ----------------------------------------------------------------

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A list of values, with its length.
pub fn put_values<T: Persist>(out: &mut Vec<u8>, values: &[T]) {
    put_u32(out, values.len() as u32);
    for value in values {
        value.persist(out);
    }
}

/// What `encode` writes, framed with its length (so a reader can skip or
/// bound it).
pub fn put_framed(out: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    put_u32(out, 0);
    encode(out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// A bounds-checked reader of what the `put_*` functions and `Persist` wrote.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "state ends at byte {} where {n} more were expected",
                self.bytes.len()
            ));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    pub fn i64(&mut self) -> Result<i64, String> {
        Ok(self.u64()? as i64)
    }

    /// A count of items each at least `min_item_bytes` long: bounded by what is
    /// left, so a corrupt count cannot make a huge allocation.
    pub fn count(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_bytes.max(1)) > self.bytes.len() - self.at {
            return Err(format!(
                "a count of {n} at byte {} does not fit the {} bytes left",
                self.at - 4,
                self.bytes.len() - self.at
            ));
        }
        Ok(n)
    }

    /// A list `put_values` wrote.
    pub fn values<T: Persist>(&mut self) -> Result<Vec<T>, String> {
        let n = self.count(4)?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(self.value()?);
        }
        Ok(values)
    }

    /// Bytes framed with their length (`put_framed`).
    pub fn framed(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub fn value<T: Persist>(&mut self) -> Result<T, String> {
        let len = self.u32()? as usize;
        T::restore(self.take(len)?)
    }

    pub fn finish(self) -> Result<(), String> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes left over after the state",
                self.bytes.len() - self.at
            ))
        }
    }
}

// ---- group states of the library operators -------------------------------

/// A map by key: its length, then each key and what `value` writes of its value.
pub fn encode_map<V>(map: &IdMap<u64, V>, out: &mut Vec<u8>, value: impl Fn(&V, &mut Vec<u8>)) {
    put_u32(out, map.len() as u32);
    for (key, v) in map {
        put_u64(out, *key);
        value(v, out);
    }
}

/// A map `encode_map` wrote, each value read by `value`.
pub fn decode_map<V>(
    bytes: &[u8],
    value: impl Fn(&mut Reader<'_>) -> Result<V, String>,
) -> Result<IdMap<u64, V>, String> {
    let mut r = Reader::new(bytes);
    let n = r.count(12)?;
    let mut map = IdMap::default();
    map.reserve(n);
    for _ in 0..n {
        let key = r.u64()?;
        map.insert(key, value(&mut r)?);
    }
    r.finish()?;
    Ok(map)
}

impl<V: Persist + Send + 'static> GroupState for IdMap<u64, V> {
    fn is_empty(&self) -> bool {
        self.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        encode_map(self, out, |v, out| v.persist(out));
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        decode_map(bytes, |r| r.value())
    }
}

/// Values by ordered key (open windows by `(end, start)`), each an inner group
/// state.
impl<K, V> GroupState for BTreeMap<K, V>
where
    K: Ord + Copy + WindowKey + Send + 'static,
    V: GroupState,
{
    fn is_empty(&self) -> bool {
        self.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.len() as u32);
        for (key, value) in self {
            key.put(out);
            put_framed(out, |out| value.encode(out));
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let n = r.count(4)?;
        let mut map = BTreeMap::new();
        for _ in 0..n {
            let key = K::get(&mut r)?;
            map.insert(key, V::decode(r.framed()?)?);
        }
        r.finish()?;
        Ok(map)
    }
}

/// The ordered keys of state maps: window bounds.
pub trait WindowKey: Sized {
    fn put(&self, out: &mut Vec<u8>);
    fn get(r: &mut Reader<'_>) -> Result<Self, String>;
}

impl WindowKey for i64 {
    fn put(&self, out: &mut Vec<u8>) {
        put_u64(out, *self as u64);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, String> {
        r.i64()
    }
}

impl WindowKey for (i64, i64) {
    fn put(&self, out: &mut Vec<u8>) {
        put_u64(out, self.0 as u64);
        put_u64(out, self.1 as u64);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, String> {
        Ok((r.i64()?, r.i64()?))
    }
}

// ---- keyed timers -----------------------------------------------------------

/// One key group's event-time timers, as `(time_ms, key)`.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct TimerGroup {
    timers: BTreeSet<(i64, u64)>,
}

impl GroupState for TimerGroup {
    fn is_empty(&self) -> bool {
        self.timers.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.timers.len() as u32);
        for &(time_ms, key) in &self.timers {
            put_u64(out, time_ms as u64);
            put_u64(out, key);
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let mut timers = BTreeSet::new();
        for _ in 0..r.count(16)? {
            let time_ms = r.i64()?;
            timers.insert((time_ms, r.u64()?));
        }
        r.finish()?;
        Ok(TimerGroup { timers })
    }
}

/// Event-time timers by key group, kept, snapshotted and restored like any
/// keyed state (an operator returns them from `Operator::state`, or keeps
/// them beside its tables in a `GroupState` of its own): `set` one per key
/// and time, and each watermark `fire`s those at or before it, in time order
/// across the groups.
pub type KeyedTimers = KeyGroups<TimerGroup>;

impl KeyGroups<TimerGroup> {
    /// A timer for `key` at `time_ms` (setting it twice keeps one).
    pub fn set(&mut self, key: u64, time_ms: i64) {
        self.for_key(key).timers.insert((time_ms, key));
    }

    /// Remove the timer for `key` at `time_ms`; whether there was one.
    pub fn cancel(&mut self, key: u64, time_ms: i64) -> bool {
        let group = self.group_of(key);
        if !self.get(group).timers.contains(&(time_ms, key)) {
            return false;
        }
        self.get_mut(group).timers.remove(&(time_ms, key))
    }

    /// Timers set, over all groups.
    pub fn timers(&self) -> usize {
        self.iter().map(|(_, g)| g.timers.len()).sum()
    }

    /// Take every timer at or before `watermark_ms` and call `fire(key,
    /// time_ms)` for each, earliest first (ties by key).
    pub fn fire(&mut self, watermark_ms: i64, mut fire: impl FnMut(u64, i64)) {
        let mut due = Vec::new();
        for group in 0..self.len() {
            let ready = self
                .get(group)
                .timers
                .first()
                .is_some_and(|&(t, _)| t <= watermark_ms);
            if !ready {
                continue;
            }
            let timers = &mut self.get_mut(group).timers;
            while let Some(&first) = timers.first() {
                if first.0 > watermark_ms {
                    break;
                }
                timers.pop_first();
                due.push(first);
            }
        }
        due.sort_unstable();
        for (time_ms, key) in due {
            fire(key, time_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Windows = KeyGroups<BTreeMap<(i64, i64), IdMap<u64, (u64, String)>>>;

    #[test]
    fn groups_round_trip_and_only_changed_ones_are_written() {
        let mut state: Windows = KeyGroups::default();
        state.init(16);
        for key in 0..100u64 {
            state
                .for_key(key)
                .entry((key as i64 % 3, 10))
                .or_default()
                .insert(key, (key * 2, format!("k{key}")));
        }
        let full = encode_groups(&state, &state.changed());
        assert_eq!(full.len(), state.non_empty().len());
        state.clear_changed();
        assert!(
            state.changed().is_empty(),
            "nothing changed since the last snapshot"
        );
        state.for_key(7).clear();
        let again = encode_groups(&state, &state.changed());
        assert_eq!(again.len(), 1);
        assert!(again[0].1.is_empty(), "a group emptied is written empty");

        let mut restored: Windows = KeyGroups::default();
        restored.init(16);
        for (group, bytes) in full.iter().chain(again.iter()) {
            restored.restore(*group, bytes).unwrap();
        }
        for key in 0..100u64 {
            let group = restored.group_of(key);
            let expect = state.get(group).clone();
            assert_eq!(restored.get(group), &expect);
        }
    }

    #[test]
    fn a_group_moves_whole_to_a_partition_of_its_own_kind_only() {
        let mut giver: KeyedState<String> = KeyGroups::default();
        giver.init(16);
        for key in 0..200u64 {
            giver.for_key(key).insert(key, format!("v{key}"));
        }
        let groups = giver.non_empty();
        let held: Vec<IdMap<u64, String>> = groups.iter().map(|&g| giver.get(g).clone()).collect();
        let mut taker: KeyedState<String> = KeyGroups::default();
        taker.init(16);
        for &group in &groups {
            let moved = giver.take_group(group).expect("a group that holds keys");
            taker.put_group(group, moved).unwrap();
        }
        assert!(
            giver.non_empty().is_empty(),
            "the giver keeps nothing it gave"
        );
        assert_eq!(taker.non_empty(), groups);
        for (&group, held) in groups.iter().zip(&held) {
            assert_eq!(taker.get(group), held, "group {group} arrived as it was");
        }
        assert!(
            giver.take_group(groups[0]).is_none(),
            "an empty group moves as None"
        );
        assert!(taker.take_group(16).is_none(), "no group beyond the job's");

        // Into a state of another kind, or beyond the job's groups: refused.
        let moved = taker.take_group(groups[0]).unwrap();
        let mut other: KeyedState<u64> = KeyGroups::default();
        other.init(16);
        assert!(other.put_group(groups[0], moved).is_err());
        let moved = taker.take_group(groups[1]).unwrap();
        assert!(taker.put_group(16, moved).is_err());
    }

    /// A `Stateful` with the trait's default moves: its groups go encoded.
    struct Encoding(KeyedState<String>);

    impl Stateful for Encoding {
        fn init(&mut self, key_groups: u32) {
            self.0.init(key_groups)
        }
        fn changed(&self) -> Vec<u32> {
            self.0.changed()
        }
        fn clear_changed(&mut self) {
            self.0.clear_changed()
        }
        fn mark_changed(&mut self, group: u32) {
            self.0.mark_changed(group)
        }
        fn non_empty(&self) -> Vec<u32> {
            self.0.non_empty()
        }
        fn encode_group(&self, group: u32, out: &mut Vec<u8>) {
            self.0.encode_group(group, out)
        }
        fn restore(&mut self, group: u32, bytes: &[u8]) -> Result<(), String> {
            self.0.restore(group, bytes)
        }
    }

    #[test]
    fn a_state_of_another_kind_moves_its_groups_encoded() {
        let mut giver = Encoding(KeyGroups::default());
        giver.init(8);
        for key in 0..50u64 {
            giver.0.for_key(key).insert(key, format!("v{key}"));
        }
        let groups = giver.non_empty();
        let held: Vec<IdMap<u64, String>> =
            groups.iter().map(|&g| giver.0.get(g).clone()).collect();
        let mut taker = Encoding(KeyGroups::default());
        taker.init(8);
        for &group in &groups {
            let moved = giver.take_group(group).expect("a group that holds keys");
            assert!(matches!(moved, MovedGroup::Encoded(_)));
            taker.put_group(group, moved).unwrap();
        }
        assert!(giver.non_empty().is_empty());
        for (&group, held) in groups.iter().zip(&held) {
            assert_eq!(taker.0.get(group), held);
        }
        assert!(giver.take_group(groups[0]).is_none());
        // A group held by a `KeyGroups` cannot go into it.
        let mut keyed: KeyedState<String> = KeyGroups::default();
        keyed.init(8);
        keyed.for_key(1).insert(1, "one".into());
        let group = keyed.group_of(1);
        let moved = keyed.take_group(group).unwrap();
        assert!(taker.put_group(group, moved).is_err());
    }

    #[test]
    fn corrupt_group_bytes_are_an_error_not_a_panic() {
        let mut state: KeyedState<String> = KeyGroups::default();
        state.init(4);
        state.for_key(1).insert(1, "one".into());
        let (group, bytes) = encode_groups(&state, &state.non_empty()).pop().unwrap();
        let mut restored: KeyedState<String> = KeyGroups::default();
        restored.init(4);
        for cut in 0..bytes.len() {
            assert!(restored.restore(group, &bytes[..cut]).is_err() || cut == 0);
        }
        let mut huge = bytes.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(restored.restore(group, &huge).is_err());
        restored.restore(group, &bytes).unwrap();
        assert_eq!(restored.get(group).get(&1).map(String::as_str), Some("one"));
    }

    #[test]
    fn keyed_timers_fire_in_time_order_across_groups_and_survive_a_snapshot() {
        let mut timers = KeyedTimers::default();
        timers.init(16);
        for key in 0..200u64 {
            timers.set(key, (key * 7 % 50) as i64);
        }
        timers.set(3, 21); // twice: kept once
        assert!(timers.cancel(4, 28));
        assert!(!timers.cancel(4, 28), "already gone");
        assert_eq!(timers.timers(), 199);
        // Snapshot every group, restore into a fresh table, and fire both.
        let snapshot = encode_groups(&timers, &timers.non_empty());
        let mut restored = KeyedTimers::default();
        restored.init(16);
        for (group, bytes) in &snapshot {
            restored.restore(*group, bytes).unwrap();
        }
        let mut fired = Vec::new();
        timers.fire(24, |key, t| fired.push((t, key)));
        let mut again = Vec::new();
        restored.fire(24, |key, t| again.push((t, key)));
        assert_eq!(fired, again, "the restored timers fire alike");
        let mut expected: Vec<(i64, u64)> = (0..200u64)
            .filter(|&k| k != 4)
            .map(|k| ((k * 7 % 50) as i64, k))
            .filter(|&(t, _)| t <= 24)
            .collect();
        expected.sort();
        assert_eq!(fired, expected, "every due timer once, earliest first");
        assert_eq!(timers.timers(), 199 - expected.len());
        // Only the groups that fired something changed.
        let changed = timers.changed();
        assert!(!changed.is_empty() && changed.len() <= 16);
    }
}

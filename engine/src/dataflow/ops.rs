//! Library operators: keyed windowed aggregation and joins, so that a job says what
//! it computes and not how windows are kept and fired.
//!
//! Every operator here is an ordinary [`Operator`] or [`JoinOperator`] used through
//! `KeyedStream::process` or `KeyedStream::join` (each has a `factory()` that
//! builds a fresh partition from shared configuration); none needs anything from
//! the engine that a hand-written operator could not have. They are separate from
//! `graph.rs` because they are policy (which state, when to fire), not plumbing.
//!
//! | operator | input -> output | state | fires |
//! |---|---|---|---|
//! | [`WindowAggregate`] | `In -> A::Out` | `key -> [(window_end, Acc)]` (key first) | every window with `end <= watermark`, in window order |
//! | [`WindowPartial`] | `In -> PartialRow<Acc>` | same | same |
//! | [`WindowMerge`] | `PartialRow<Acc> -> A::Out` | `(window_end, window_start) -> key -> Acc` (keyed by window), merged from partials | same |
//! | [`WindowJoin`] | `(L, R) -> Out` | `window_start -> key -> records` of both inputs | a window at its end |
//! | [`UnboundedJoin`] | `(L, R) -> Out` | `key -> records` of both inputs, until end of input | a pair as soon as both halves are in |
//!
//! **Aggregates.** An [`Aggregate`] folds records into an accumulator per key and
//! window and turns it into output records when the window fires. One that says
//! `MERGEABLE` promises that `merge` is associative and commutative and that merging
//! the accumulators of two disjoint sets of records equals folding their union; only
//! such an aggregate may run in two phases.
//!
//! **Two phases.** Streams are typed, so a partial accumulator travels between the
//! phases as what it is: a [`PartialRow`] `{ key, window, acc }`. Phase 1 is
//! [`WindowPartial`] (it emits every key's partial as its window fires); phase 2 is
//! [`WindowMerge`], keyed by window, which merges the partials by key and emits the
//! final records. When phase 1 is keyed by the aggregate's key, every key's
//! accumulator is already complete there, and `WindowPartial::keys_complete` lets it
//! apply the aggregate's selection ([`Aggregate::select`], e.g. [`TopKeys`]) before
//! anything leaves: q5 does that so that only each partition's leading auctions
//! cross to phase 2.
//!
//! **Late records.** Sources emit in time order and a stage's watermark is the
//! minimum of its inputs, so a record should never belong to a window that has
//! already fired. If one does, it is not silently lost: the operator counts it
//! (`late_records()`), the engine adds it to the job's `late` count in every
//! build, and the record is dropped from that window (windows still open take it).
//!
//! **Time is checked.** A record whose time puts a window edge outside `i64`
//! (a time near `i64::MIN` or `i64::MAX`) belongs to no window: it is counted as
//! late rather than wrapping around into a wrong window.
//!
//! **State is what the input holds.** The joins keep records as they arrive; a
//! job that needs only a few fields of a wide record should project it with a
//! `map` before the join (a fused step, so it costs no stage): q3 and q8 keep a
//! person as its output row, not as the whole person, and q3 an auction as its
//! id and seller.
//!
//! **Costs.** Per record of a windowed aggregation: one call of the time and
//! key functions (dynamic), one hash lookup (the id hasher; none for a run of
//! records of one key) that finds the key's open windows, a short walk over
//! them and the aggregate's `add` per window the record falls in. A window
//! fires by one pass over the keys of the groups that hold it, one window at
//! a time. Window joins hold every record of an open window
//! (the semi-join only the keys of its right input); the unbounded join holds
//! both inputs until the end of input, except that with `left_key_unique` a right
//! record is dropped once it has met its left partner.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::sync::Arc;

use super::graph::{Data, JoinFactory, JoinOperator, KeyFn, Operator, OperatorFactory};
use super::state::{
    decode_map, encode_map, put_framed, put_u32, put_u64, put_values, GroupState, KeyGroups,
    Persist, Reader, Stateful,
};
use super::window::{complete, sliding, tumbling};
use crate::ids::{IdBuildHasher, IdMap};

/// A window as `(start, end)`, half-open, in ms of event time.
pub type Window = (i64, i64);

/// The event time of a record, in ms.
pub type TimeFn<T> = Arc<dyn Fn(&T) -> i64 + Send + Sync>;

/// Accumulators of one window, by key.
pub type Accs<A> = IdMap<u64, A>;

/// Accumulators of one fired window, by key (each key once).
pub type Fired<A> = Vec<(u64, A)>;

/// One key's partial accumulator of one window, between the two phases.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PartialRow<Acc> {
    pub key: u64,
    pub window: Window,
    pub acc: Acc,
}

/// Which windows a record's time falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSpec {
    Tumbling { size_ms: i64 },
    Sliding { size_ms: i64, slide_ms: i64 },
}

impl WindowSpec {
    fn assert_valid(&self) {
        match *self {
            WindowSpec::Tumbling { size_ms } => assert!(size_ms > 0, "window size must be > 0"),
            WindowSpec::Sliding { size_ms, slide_ms } => assert!(
                size_ms > 0 && slide_ms > 0,
                "window size and slide must be > 0"
            ),
        }
    }

    /// The length of every window.
    fn size_ms(&self) -> i64 {
        match *self {
            WindowSpec::Tumbling { size_ms } | WindowSpec::Sliding { size_ms, .. } => size_ms,
        }
    }

    /// Call `f` with every window that holds `time_ms`, earliest first; `false` if
    /// a window of the time would not fit in `i64` (then `f` is not called).
    #[inline]
    fn for_each(&self, time_ms: i64, mut f: impl FnMut(Window)) -> bool {
        match *self {
            WindowSpec::Tumbling { size_ms } => match tumbling(time_ms, size_ms) {
                Some(window) => {
                    f(window);
                    true
                }
                None => false,
            },
            WindowSpec::Sliding { size_ms, slide_ms } => {
                match sliding(time_ms, size_ms, slide_ms) {
                    Some(windows) => {
                        windows.for_each(f);
                        true
                    }
                    None => false,
                }
            }
        }
    }
}

/// Folds records into an accumulator per key and window.
pub trait Aggregate<In>: Send + Sync + 'static {
    /// Kept in state by key group, so an rkyv type (checkpoints write it).
    type Acc: Data + Persist;
    type Out: Data;
    /// `merge` is associative and commutative, and merging the accumulators of two
    /// disjoint sets of records equals adding their union: the aggregate may run in
    /// two phases ([`WindowPartial`], [`WindowMerge`]).
    const MERGEABLE: bool;

    fn new_acc(&self) -> Self::Acc;
    fn add(&self, acc: &mut Self::Acc, record: &In);
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc);
    /// The output records of one key's accumulator when its window fires.
    fn emit(&self, key: u64, window: Window, acc: Self::Acc, out: &mut Vec<Self::Out>);
    /// Which keys of a fired window emit: all by default. Override to select
    /// across keys (see [`TopKeys`]).
    fn select(&self, _fired: &mut Fired<Self::Acc>) {}
}

type CountOutputFn<Out> = Arc<dyn Fn(u64, Window, u64) -> Out + Send + Sync>;

/// Records per key and window; emits `output(key, window, count)`.
pub struct Count<In, Out> {
    output: CountOutputFn<Out>,
    _in: PhantomData<fn(&In)>,
}

impl<In, Out> Count<In, Out> {
    pub fn new(output: impl Fn(u64, Window, u64) -> Out + Send + Sync + 'static) -> Self {
        Count {
            output: Arc::new(output),
            _in: PhantomData,
        }
    }
}

impl<In: 'static, Out: Data> Aggregate<In> for Count<In, Out> {
    type Acc = u64;
    type Out = Out;
    const MERGEABLE: bool = true;

    fn new_acc(&self) -> u64 {
        0
    }
    #[inline]
    fn add(&self, acc: &mut u64, _record: &In) {
        *acc += 1;
    }
    fn merge(&self, acc: &mut u64, other: u64) {
        *acc += other;
    }
    fn emit(&self, key: u64, window: Window, acc: u64, out: &mut Vec<Out>) {
        out.push((self.output)(key, window, acc));
    }
}

type KeepFn<In, Out> = Arc<dyn Fn(&In) -> Out + Send + Sync>;

/// Every record that ties the maximum of `value` per key and window: keeps
/// `keep(record)` (the output row) of each, and emits them all.
pub struct MaxWithTies<In, V, F, Out> {
    value: F,
    keep: KeepFn<In, Out>,
    _value: PhantomData<fn() -> V>,
}

impl<In, V, F: Fn(&In) -> V, Out> MaxWithTies<In, V, F, Out> {
    pub fn new(value: F, keep: impl Fn(&In) -> Out + Send + Sync + 'static) -> Self {
        MaxWithTies {
            value,
            keep: Arc::new(keep),
            _value: PhantomData,
        }
    }
}

impl<In, V, F, Out> Aggregate<In> for MaxWithTies<In, V, F, Out>
where
    In: 'static,
    V: Ord + Clone + Send + 'static,
    F: Fn(&In) -> V + Send + Sync + 'static,
    Out: Data,
    Option<(V, Vec<Out>)>: Persist + Data,
{
    /// The maximum so far and the kept rows that reach it.
    type Acc = Option<(V, Vec<Out>)>;
    type Out = Out;
    const MERGEABLE: bool = true;

    fn new_acc(&self) -> Self::Acc {
        None
    }
    #[inline]
    fn add(&self, acc: &mut Self::Acc, record: &In) {
        let value = (self.value)(record);
        match acc {
            Some((best, _)) if value < *best => {}
            Some((best, rows)) if value == *best => rows.push((self.keep)(record)),
            _ => *acc = Some((value, vec![(self.keep)(record)])),
        }
    }
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc) {
        let Some((value, other_rows)) = other else {
            return;
        };
        match acc {
            Some((best, _)) if value < *best => {}
            Some((best, rows)) if value == *best => rows.extend(other_rows),
            _ => *acc = Some((value, other_rows)),
        }
    }
    fn emit(&self, _key: u64, _window: Window, acc: Self::Acc, out: &mut Vec<Out>) {
        if let Some((_, rows)) = acc {
            out.extend(rows);
        }
    }
}

/// Wraps an aggregate so that a fired window emits only the keys whose
/// accumulator ranks highest under `rank`, ties included ("the auctions with the
/// most bids"). Adding, merging and emitting are the inner aggregate's.
pub struct TopKeys<A, F> {
    inner: A,
    rank: F,
}

impl<A, F> TopKeys<A, F> {
    pub fn new(inner: A, rank: F) -> Self {
        TopKeys { inner, rank }
    }
}

impl<In, A, F, V> Aggregate<In> for TopKeys<A, F>
where
    A: Aggregate<In>,
    F: Fn(&A::Acc) -> V + Send + Sync + 'static,
    V: Ord,
{
    type Acc = A::Acc;
    type Out = A::Out;
    const MERGEABLE: bool = A::MERGEABLE;

    fn new_acc(&self) -> A::Acc {
        self.inner.new_acc()
    }
    #[inline]
    fn add(&self, acc: &mut A::Acc, record: &In) {
        self.inner.add(acc, record);
    }
    fn merge(&self, acc: &mut A::Acc, other: A::Acc) {
        self.inner.merge(acc, other);
    }
    fn emit(&self, key: u64, window: Window, acc: A::Acc, out: &mut Vec<A::Out>) {
        self.inner.emit(key, window, acc, out);
    }
    fn select(&self, fired: &mut Fired<A::Acc>) {
        self.inner.select(fired);
        let Some(best) = fired.iter().map(|(_, acc)| (self.rank)(acc)).max() else {
            return;
        };
        fired.retain(|(_, acc)| (self.rank)(acc) == best);
    }
}

/// Open windows by `(end, start)`, so that the first entry is the next to fire:
/// what one key group of [`WindowMerge`] (keyed by window) holds.
type Windows<Acc> = BTreeMap<(i64, i64), Accs<Acc>>;

/// Remove from every key group each window whose end the watermark reached,
/// gathered by window (a window's keys are spread over the groups).
fn take_complete<T>(
    groups: &mut KeyGroups<BTreeMap<(i64, i64), T>>,
    watermark_ms: i64,
    mut gather: impl FnMut((i64, i64), T),
) where
    BTreeMap<(i64, i64), T>: GroupState,
{
    for group in 0..groups.len() {
        let due = groups
            .get(group)
            .first_key_value()
            .is_some_and(|(&(end, _), _)| complete(end, watermark_ms));
        if !due {
            continue;
        }
        let windows = groups.get_mut(group);
        while let Some(entry) = windows.first_entry() {
            if !complete(entry.key().0, watermark_ms) {
                break;
            }
            let key = *entry.key();
            gather(key, entry.remove());
        }
    }
}

/// Windows due at once (`(end, start)`), each with its keys.
type Due<Acc> = Vec<((i64, i64), Fired<Acc>)>;

/// Windows due at once, each with its keys: hand each, in window order and
/// after the aggregate's selection when `select`, to `fire`.
fn fire_due<In, A: Aggregate<In>>(
    mut due: Due<A::Acc>,
    aggregate: &A,
    select: bool,
    mut fire: impl FnMut(&A, Window, Fired<A::Acc>),
) {
    due.sort_unstable_by_key(|(window, _)| *window);
    for ((end, start), mut fired) in due {
        if select {
            aggregate.select(&mut fired);
        }
        fire(aggregate, (start, end), fired);
    }
}

/// The keys of `window` among those already `due` (few windows fire at once:
/// a linear search).
fn due_window<Acc>(due: &mut Vec<((i64, i64), Fired<Acc>)>, window: (i64, i64)) -> &mut Fired<Acc> {
    let at = match due.iter().position(|(w, _)| *w == window) {
        Some(at) => at,
        None => {
            due.push((window, Vec::new()));
            due.len() - 1
        }
    };
    &mut due[at].1
}

/// Remove every window of `WindowMerge`'s groups whose end the watermark
/// reached and hand each to `fire` (see `fire_due`).
fn fire_complete<In, A: Aggregate<In>>(
    groups: &mut KeyGroups<Windows<A::Acc>>,
    watermark_ms: i64,
    aggregate: &A,
    select: bool,
    fire: impl FnMut(&A, Window, Fired<A::Acc>),
) {
    let mut due = Vec::new();
    take_complete(groups, watermark_ms, |window, accs| {
        due_window(&mut due, window).extend(accs)
    });
    fire_due(due, aggregate, select, fire);
}

/// `fire` for final output: `A::emit` of every key of the window.
fn emit_all<In, A: Aggregate<In>>(
    out: &mut Vec<A::Out>,
) -> impl FnMut(&A, Window, Fired<A::Acc>) + '_ {
    move |aggregate, window, fired| {
        for (key, acc) in fired {
            aggregate.emit(key, window, acc, out);
        }
    }
}

/// One key's open windows, `(end, acc)` in end order.
type OpenWindows<Acc> = Vec<(i64, Acc)>;

/// What one key group of a windowed aggregation holds, key first: per key its
/// open windows as `(end, acc)` in end order (a state has one window size,
/// so the end names the window), so that a record finds every window it falls
/// in with one hash lookup (q5's sliding windows take each record into five).
/// `next_end` is the earliest end of any window here (`i64::MAX` when none),
/// so a watermark short of it passes the group by.
pub struct KeyWindows<Acc> {
    keys: IdMap<u64, OpenWindows<Acc>>,
    next_end: i64,
}

impl<Acc> Default for KeyWindows<Acc> {
    fn default() -> Self {
        KeyWindows {
            keys: IdMap::default(),
            next_end: i64::MAX,
        }
    }
}

impl<Acc> KeyWindows<Acc> {
    /// Remove the window that ends at `end` (the earliest here) into `fired`.
    fn take_window(&mut self, end: i64, fired: &mut Fired<Acc>) {
        debug_assert!(self.next_end >= end);
        if self.next_end != end {
            return;
        }
        let mut next_end = i64::MAX;
        self.keys.retain(|&key, windows| {
            if windows[0].0 == end {
                let (_, acc) = windows.remove(0);
                fired.push((key, acc));
            }
            match windows.first() {
                Some(&(first, _)) => {
                    next_end = next_end.min(first);
                    true
                }
                None => false,
            }
        });
        self.next_end = next_end;
        // A table that emptied after a burst gives its memory back.
        if self.keys.capacity() > 64 && self.keys.capacity() / 8 > self.keys.len() {
            self.keys.shrink_to_fit();
        }
    }
}

impl<Acc: Persist + Send + 'static> GroupState for KeyWindows<Acc> {
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys, then per key its windows: the end and the accumulator.
    fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.keys.len() as u32);
        for (key, windows) in &self.keys {
            put_u64(out, *key);
            put_u32(out, windows.len() as u32);
            for (end, acc) in windows {
                put_u64(out, *end as u64);
                acc.persist(out);
            }
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let n = r.count(12)?;
        let mut state = KeyWindows::default();
        state.keys.reserve(n);
        for _ in 0..n {
            let key = r.u64()?;
            let count = r.count(12)?;
            if count == 0 {
                return Err(format!("key {key} is held with no window"));
            }
            let mut windows = Vec::with_capacity(count);
            for _ in 0..count {
                let end = r.i64()?;
                if windows.last().is_some_and(|&(e, _)| e >= end) {
                    return Err(format!("the windows of key {key} are out of order"));
                }
                windows.push((end, r.value()?));
            }
            state.next_end = state.next_end.min(windows[0].0);
            if state.keys.insert(key, windows).is_some() {
                return Err(format!("key {key} is held twice"));
            }
        }
        r.finish()?;
        Ok(state)
    }
}

/// The per-window accumulators of a windowed aggregation, fed by records.
struct WindowState<In, A: Aggregate<In>> {
    spec: WindowSpec,
    time: TimeFn<In>,
    key: KeyFn<In>,
    aggregate: Arc<A>,
    windows: KeyGroups<KeyWindows<A::Acc>>,
    watermark_ms: i64,
    late_records: u64,
    /// The open windows of the record at hand (reused).
    scratch: Vec<Window>,
    /// A window being fired, a step at a time.
    firing: Option<Firing<A::Acc>>,
    /// Keys a fire visits in one step (`fire_step_keys`).
    step_keys: usize,
    /// The last `fire_step` ran out with windows left to fire.
    unfinished: bool,
}

/// Keys a window fire visits in one step unless an operator says otherwise.
/// At 32,768 a fire step of q5's first phase took 3.5 to 5 ms during a
/// burst (timed in a trace, not kept); at this size a co-tenant waits less,
/// and q3, q5 and q7 ran as fast (20M events, one core, five runs
/// alternated: 1.04, 1.01, 1.00 of the larger step).
pub const FIRE_STEP_KEYS: usize = 4_096;

/// A window fired over several steps: its keys taken so far, and the next
/// key group to take them from.
struct Firing<Acc> {
    end: i64,
    fired: Fired<Acc>,
    next_group: u32,
}

impl<In: 'static, A: Aggregate<In>> WindowState<In, A> {
    fn new(spec: WindowSpec, time: TimeFn<In>, key: KeyFn<In>, aggregate: Arc<A>) -> Self {
        spec.assert_valid();
        WindowState {
            spec,
            time,
            key,
            aggregate,
            windows: KeyGroups::default(),
            watermark_ms: i64::MIN,
            late_records: 0,
            scratch: Vec::new(),
            firing: None,
            step_keys: FIRE_STEP_KEYS,
            unfinished: false,
        }
    }

    /// A maker of empty states with this configuration (what a factory keeps).
    fn maker(self) -> impl Fn() -> Self + Send + Sync + 'static {
        let (spec, time, key, aggregate) = (self.spec, self.time, self.key, self.aggregate);
        let step_keys = self.step_keys;
        move || {
            let mut state = Self::new(spec, time.clone(), key.clone(), aggregate.clone());
            state.step_keys = step_keys;
            state
        }
    }

    /// The end of the earliest window the watermark completed, if any.
    fn due_end(&self) -> Option<i64> {
        let groups = &self.windows;
        (0..groups.len())
            .map(|g| groups.get(g))
            .filter(|group| !group.keys.is_empty())
            .map(|group| group.next_end)
            .min()
            .filter(|&end| complete(end, self.watermark_ms))
    }

    /// A window is being fired, or one is due: the last `fire_step` ran
    /// out (records cannot make a window due, only the watermark).
    fn pending(&self) -> bool {
        self.unfinished
    }

    /// Move the watermark on (what it completes fires in `fire_step`).
    fn advance(&mut self, watermark_ms: i64) {
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
    }

    /// Hand the windows the watermark completed to `fire`, in window order
    /// (after the aggregate's selection when `select`), visiting about
    /// `step_keys` keys at most: true once none is left, false if this step
    /// ran out (call again). One window at a time, so that what is held at
    /// once beside the state is one window's keys even when the end of
    /// input completes them all. Records that come in between steps cannot
    /// belong to a window being fired (its end is behind the watermark:
    /// they are late) and go to later windows.
    fn fire_step(&mut self, select: bool, fire: impl FnMut(&A, Window, Fired<A::Acc>)) -> bool {
        let done = self.fire_within(select, fire);
        self.unfinished = !done;
        done
    }

    fn fire_within(
        &mut self,
        select: bool,
        mut fire: impl FnMut(&A, Window, Fired<A::Acc>),
    ) -> bool {
        let mut budget = self.step_keys.max(1);
        loop {
            let mut firing = match self.firing.take() {
                Some(firing) => firing,
                None => {
                    let Some(end) = self.due_end() else {
                        return true;
                    };
                    if budget == 0 {
                        return false;
                    }
                    // At most one entry per key of the groups that hold it.
                    let groups = &self.windows;
                    let keys = (0..groups.len())
                        .map(|g| groups.get(g))
                        .filter(|group| group.next_end == end)
                        .map(|group| group.keys.len())
                        .sum();
                    Firing {
                        end,
                        fired: Vec::with_capacity(keys),
                        next_group: 0,
                    }
                }
            };
            let groups = &mut self.windows;
            while firing.next_group < groups.len() {
                if budget == 0 {
                    self.firing = Some(firing);
                    return false;
                }
                let group = firing.next_group;
                firing.next_group += 1;
                // No group holds an earlier window (this one was the
                // earliest due, and later records are for later windows).
                if groups.get(group).next_end == firing.end {
                    let keys = groups.get(group).keys.len();
                    groups
                        .get_mut(group)
                        .take_window(firing.end, &mut firing.fired);
                    budget = budget.saturating_sub(keys.max(1));
                }
            }
            let Firing { end, mut fired, .. } = firing;
            if select {
                self.aggregate.select(&mut fired);
            }
            fire(&self.aggregate, (end - self.spec.size_ms(), end), fired);
        }
    }

    fn add(&mut self, records: &[In]) {
        let watermark_ms = self.watermark_ms;
        let aggregate = &*self.aggregate;
        let open = &mut self.scratch;
        let groups = &mut self.windows;
        // The last key's windows and its group's `next_end`: a run of records
        // of one key (q7's phase 1 has one key) looks it up once.
        let mut held: Option<(u64, &mut OpenWindows<A::Acc>, &mut i64)> = None;
        for record in records {
            let mut late = false;
            open.clear();
            let fits = self.spec.for_each((self.time)(record), |(start, end)| {
                if complete(end, watermark_ms) {
                    late = true;
                } else {
                    open.push((start, end));
                }
            });
            self.late_records += (late || !fits) as u64;
            let Some(&(_, first_end)) = open.first() else {
                continue;
            };
            let key = (self.key)(record);
            if held.as_ref().is_none_or(|(k, _, _)| *k != key) {
                let KeyWindows { keys, next_end } = groups.for_key(key);
                // Room for the windows of this record and one more (the
                // key's next record may open the window after them).
                let windows = keys
                    .entry(key)
                    .or_insert_with(|| Vec::with_capacity(open.len()));
                held = Some((key, windows, next_end));
            }
            let Some((_, windows, next_end)) = held.as_mut() else {
                unreachable!("held was just set");
            };
            **next_end = (**next_end).min(first_end);
            // Both in end order (one spec: a window is known by its end), so
            // one pass from the first; mostly a push at the end.
            let mut at = windows.partition_point(|w| w.0 < first_end);
            for &(_, end) in open.iter() {
                while at < windows.len() && windows[at].0 < end {
                    at += 1;
                }
                if at == windows.len() || windows[at].0 != end {
                    windows.insert(at, (end, aggregate.new_acc()));
                }
                aggregate.add(&mut windows[at].1, record);
                at += 1;
            }
        }
    }
}

/// Keyed windowed aggregation: per window of `spec` and per `key(record)`, an
/// accumulator of `A`; every window fires once, when the watermark reaches its end,
/// and emits `A::emit` of each selected key.
pub struct WindowAggregate<In, A: Aggregate<In>> {
    state: WindowState<In, A>,
}

impl<In: Data, A: Aggregate<In>> WindowAggregate<In, A> {
    pub fn new(
        spec: WindowSpec,
        time: impl Fn(&In) -> i64 + Send + Sync + 'static,
        key: impl Fn(&In) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Self {
        WindowAggregate {
            state: WindowState::new(spec, Arc::new(time), Arc::new(key), Arc::new(aggregate)),
        }
    }

    /// Records that fell in a window that had already fired (in that window they
    /// were not counted; windows still open did take them), or in no window at all.
    pub fn late_records(&self) -> u64 {
        self.state.late_records
    }

    /// Keys a window fire visits in one step (default [`FIRE_STEP_KEYS`]):
    /// a larger window fires over several turns of its actor.
    pub fn fire_step_keys(mut self, keys: usize) -> Self {
        self.state.step_keys = keys.max(1);
        self
    }

    /// The stage's operator factory: every partition starts empty, with this
    /// configuration.
    pub fn factory(self) -> OperatorFactory<In, A::Out> {
        let fresh = self.state.maker();
        Arc::new(move |_| Box::new(WindowAggregate { state: fresh() }))
    }
}

impl<In: Data, A: Aggregate<In>> Operator<In, A::Out> for WindowAggregate<In, A> {
    fn on_records(&mut self, records: Vec<In>, _out: &mut Vec<A::Out>) {
        self.state.add(&records);
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<A::Out>) {
        self.state.advance(watermark_ms);
        self.state.fire_step(true, emit_all(out));
    }

    fn firing(&self) -> bool {
        self.state.pending()
    }

    fn fire_more(&mut self, out: &mut Vec<A::Out>) -> bool {
        self.state.fire_step(true, emit_all(out))
    }

    fn late_records(&self) -> u64 {
        self.state.late_records
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.state.windows)
    }

    /// A mergeable aggregate adds up alike in any order, and a window
    /// emits only when the watermark fires it.
    fn accepts_unordered(&self) -> bool {
        A::MERGEABLE
    }
}

/// Phase 1 of two: per window and key an accumulator, emitted as a
/// [`PartialRow`] when the window fires, for a [`WindowMerge`] keyed by window.
pub struct WindowPartial<In, A: Aggregate<In>> {
    state: WindowState<In, A>,
    /// Apply the aggregate's selection here (every key is complete in this phase).
    select: bool,
}

impl<In: Data, A: Aggregate<In>> WindowPartial<In, A> {
    pub fn new(
        spec: WindowSpec,
        time: impl Fn(&In) -> i64 + Send + Sync + 'static,
        key: impl Fn(&In) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Self {
        Self::shared(spec, Arc::new(time), Arc::new(key), Arc::new(aggregate))
    }

    pub(crate) fn shared(
        spec: WindowSpec,
        time: TimeFn<In>,
        key: KeyFn<In>,
        aggregate: Arc<A>,
    ) -> Self {
        const {
            assert!(
                A::MERGEABLE,
                "only a mergeable aggregate runs in two phases"
            )
        };
        WindowPartial {
            state: WindowState::new(spec, time, key, aggregate),
            select: false,
        }
    }

    /// Promise that this stage is keyed by the aggregate's key, so each key's
    /// accumulator is complete here: the aggregate's selection (e.g. `TopKeys`) may
    /// run in this phase, and only the selected keys travel to phase 2.
    pub fn keys_complete(mut self) -> Self {
        self.select = true;
        self
    }

    pub fn late_records(&self) -> u64 {
        self.state.late_records
    }

    /// As [`WindowAggregate::fire_step_keys`].
    pub fn fire_step_keys(mut self, keys: usize) -> Self {
        self.state.step_keys = keys.max(1);
        self
    }

    /// Hand each window's keys, fired, to `out` as partial rows.
    fn fire_step(&mut self, out: &mut Vec<PartialRow<A::Acc>>) -> bool {
        self.state.fire_step(self.select, |_, window, fired| {
            out.extend(
                fired
                    .into_iter()
                    .map(|(key, acc)| PartialRow { key, window, acc }),
            );
        })
    }

    pub fn factory(self) -> OperatorFactory<In, PartialRow<A::Acc>> {
        let (fresh, select) = (self.state.maker(), self.select);
        Arc::new(move |_| {
            Box::new(WindowPartial {
                state: fresh(),
                select,
            })
        })
    }
}

impl<In: Data, A: Aggregate<In>> Operator<In, PartialRow<A::Acc>> for WindowPartial<In, A> {
    fn on_records(&mut self, records: Vec<In>, _out: &mut Vec<PartialRow<A::Acc>>) {
        self.state.add(&records);
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<PartialRow<A::Acc>>) {
        self.state.advance(watermark_ms);
        self.fire_step(out);
    }

    fn firing(&self) -> bool {
        self.state.pending()
    }

    fn fire_more(&mut self, out: &mut Vec<PartialRow<A::Acc>>) -> bool {
        self.fire_step(out)
    }

    fn late_records(&self) -> u64 {
        self.state.late_records
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.state.windows)
    }

    /// Unless its keys are complete here (`keys_complete`), its
    /// accumulators are partials of the aggregate's key, which the merge
    /// phase adds up: they stay where they are.
    fn keeps_partials(&self) -> bool {
        !self.select
    }

    /// Its aggregate is mergeable (it runs in two phases).
    fn accepts_unordered(&self) -> bool {
        true
    }
}

/// Phase 2 of a two-phase aggregation: merges partials per window and key, and
/// emits `A::emit` of each selected key when the window fires. Key its input by
/// the window's end (`|p| p.window.1 as u64`) so that a window's partials meet:
/// its state is kept in that key's group, which a reroute moves.
pub struct WindowMerge<In, A: Aggregate<In>> {
    aggregate: Arc<A>,
    /// Kept in the key group of the window's end (the stage's key).
    windows: KeyGroups<Windows<A::Acc>>,
    watermark_ms: i64,
    late_records: u64,
    _in: PhantomData<fn(&In)>,
}

impl<In: Data, A: Aggregate<In>> WindowMerge<In, A> {
    pub fn new(aggregate: A) -> Self {
        Self::shared(Arc::new(aggregate))
    }

    pub(crate) fn shared(aggregate: Arc<A>) -> Self {
        const {
            assert!(
                A::MERGEABLE,
                "only a mergeable aggregate runs in two phases"
            )
        };
        WindowMerge {
            aggregate,
            windows: KeyGroups::default(),
            watermark_ms: i64::MIN,
            late_records: 0,
            _in: PhantomData,
        }
    }

    /// Partials of a window that had already fired (dropped, counted).
    pub fn late_records(&self) -> u64 {
        self.late_records
    }

    pub fn factory(self) -> OperatorFactory<PartialRow<A::Acc>, A::Out> {
        let aggregate = self.aggregate;
        Arc::new(move |_| Box::new(Self::shared(aggregate.clone())))
    }
}

impl<In: Data, A: Aggregate<In>> Operator<PartialRow<A::Acc>, A::Out> for WindowMerge<In, A> {
    fn on_records(&mut self, records: Vec<PartialRow<A::Acc>>, _out: &mut Vec<A::Out>) {
        for PartialRow { key, window, acc } in records {
            let (start, end) = window;
            if complete(end, self.watermark_ms) {
                self.late_records += 1;
                continue;
            }
            let windows = self.windows.for_key(end as u64);
            match windows.entry((end, start)).or_default().entry(key) {
                Entry::Occupied(mut slot) => self.aggregate.merge(slot.get_mut(), acc),
                Entry::Vacant(slot) => {
                    slot.insert(acc);
                }
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<A::Out>) {
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
        let aggregate = &*self.aggregate;
        fire_complete(
            &mut self.windows,
            self.watermark_ms,
            aggregate,
            true,
            emit_all(out),
        );
    }

    fn late_records(&self) -> u64 {
        self.late_records
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.windows)
    }

    /// Partials merge alike in any order, and a window emits only when the
    /// watermark fires it.
    fn accepts_unordered(&self) -> bool {
        true
    }
}

type PairFn<L, R, Out> = Arc<dyn Fn(&L, &R, i64) -> Option<Out> + Send + Sync>;
type SemiFn<L, Out> = Arc<dyn Fn(&L, i64) -> Option<Out> + Send + Sync>;

/// What a window join makes of a fired window.
enum JoinOutput<L, R, Out> {
    /// `output(left, right, window_start)` for every pair with equal keys; with a
    /// dedup key, one output row per dedup key and window.
    Pairs {
        output: PairFn<L, R, Out>,
        dedup: Option<KeyFn<Out>>,
    },
    /// `output(left, window_start)` for every left record with at least one right
    /// record of its key; only the right keys are kept.
    Semi(SemiFn<L, Out>),
}

impl<L, R, Out> Clone for JoinOutput<L, R, Out> {
    fn clone(&self) -> Self {
        match self {
            JoinOutput::Pairs { output, dedup } => JoinOutput::Pairs {
                output: output.clone(),
                dedup: dedup.clone(),
            },
            JoinOutput::Semi(output) => JoinOutput::Semi(output.clone()),
        }
    }
}

struct JoinWindow<L, R> {
    /// Left records with their keys, in arrival order (only looked up by the right).
    left: Vec<(u64, L)>,
    right: IdMap<u64, Vec<R>>,
    right_keys: HashSet<u64, IdBuildHasher>,
}

impl<L, R> Default for JoinWindow<L, R> {
    fn default() -> Self {
        JoinWindow {
            left: Vec::new(),
            right: IdMap::default(),
            right_keys: HashSet::default(),
        }
    }
}

impl<L, R> GroupState for JoinWindow<L, R>
where
    L: Persist + Send + 'static,
    R: Persist + Send + 'static,
{
    fn is_empty(&self) -> bool {
        self.left.is_empty() && self.right.is_empty() && self.right_keys.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.left.len() as u32);
        for (key, record) in &self.left {
            put_u64(out, *key);
            record.persist(out);
        }
        put_framed(out, |out| {
            encode_map(&self.right, out, |v, out| put_values(out, v))
        });
        put_u32(out, self.right_keys.len() as u32);
        for key in &self.right_keys {
            put_u64(out, *key);
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let mut window = JoinWindow::default();
        for _ in 0..r.count(12)? {
            let key = r.u64()?;
            window.left.push((key, r.value()?));
        }
        window.right = decode_map(r.framed()?, |r| r.values())?;
        for _ in 0..r.count(8)? {
            window.right_keys.insert(r.u64()?);
        }
        r.finish()?;
        Ok(window)
    }
}

/// How a join reads one side: its event time and its key.
pub struct Side<T> {
    time: TimeFn<T>,
    key: KeyFn<T>,
}

impl<T> Clone for Side<T> {
    fn clone(&self) -> Self {
        Side {
            time: self.time.clone(),
            key: self.key.clone(),
        }
    }
}

impl<T> Side<T> {
    pub fn new(
        time: impl Fn(&T) -> i64 + Send + Sync + 'static,
        key: impl Fn(&T) -> u64 + Send + Sync + 'static,
    ) -> Self {
        Side {
            time: Arc::new(time),
            key: Arc::new(key),
        }
    }
}

/// Tumbling-window equi-join of the left and right inputs on their keys (the
/// stage's key): a left and a right record meet if they have the same key and fall
/// in the same window; the window's output is made when it fires.
pub struct WindowJoin<L, R, Out> {
    size_ms: i64,
    left_side: Side<L>,
    right_side: Side<R>,
    output: JoinOutput<L, R, Out>,
    /// Open windows by `(end, start)`, in the key group of the join key.
    windows: KeyGroups<BTreeMap<(i64, i64), JoinWindow<L, R>>>,
    watermark_ms: i64,
    late_records: u64,
}

impl<L: Data + Persist, R: Data + Persist, Out: Data> WindowJoin<L, R, Out> {
    /// Every matching pair, through `output(left, right, window_start)`.
    pub fn new(
        size_ms: i64,
        left: Side<L>,
        right: Side<R>,
        output: impl Fn(&L, &R, i64) -> Option<Out> + Send + Sync + 'static,
    ) -> Self {
        let output = JoinOutput::Pairs {
            output: Arc::new(output),
            dedup: None,
        };
        Self::with_output(size_ms, left, right, output)
    }

    /// A semi-join: `output(left, window_start)` once for every left record that
    /// has a right record of its key in its window. Keeps only the right keys.
    pub fn semi(
        size_ms: i64,
        left: Side<L>,
        right: Side<R>,
        output: impl Fn(&L, i64) -> Option<Out> + Send + Sync + 'static,
    ) -> Self {
        Self::with_output(size_ms, left, right, JoinOutput::Semi(Arc::new(output)))
    }

    /// Emit one output row per `dedup(row)` and window (the first made).
    /// Has no effect on a semi-join, which emits once per left record already.
    pub fn dedup(mut self, dedup: impl Fn(&Out) -> u64 + Send + Sync + 'static) -> Self {
        if let JoinOutput::Pairs { dedup: slot, .. } = &mut self.output {
            *slot = Some(Arc::new(dedup));
        }
        self
    }

    fn with_output(
        size_ms: i64,
        left_side: Side<L>,
        right_side: Side<R>,
        output: JoinOutput<L, R, Out>,
    ) -> Self {
        assert!(size_ms > 0, "window size must be > 0");
        WindowJoin {
            size_ms,
            left_side,
            right_side,
            output,
            windows: KeyGroups::default(),
            watermark_ms: i64::MIN,
            late_records: 0,
        }
    }

    /// Records of a window that had already fired, or of no window (dropped, counted).
    pub fn late_records(&self) -> u64 {
        self.late_records
    }

    pub fn factory(self) -> JoinFactory<L, R, Out> {
        let WindowJoin {
            size_ms,
            left_side,
            right_side,
            output,
            ..
        } = self;
        Arc::new(move |_| {
            Box::new(Self::with_output(
                size_ms,
                left_side.clone(),
                right_side.clone(),
                output.clone(),
            ))
        })
    }

    /// The open window `time_ms` falls in, or `None` (counted late) if it has
    /// fired or does not fit in `i64`.
    fn window_of(&mut self, key: u64, time_ms: i64) -> Option<&mut JoinWindow<L, R>> {
        match tumbling(time_ms, self.size_ms) {
            Some((start, end)) if !complete(end, self.watermark_ms) => {
                Some(self.windows.for_key(key).entry((end, start)).or_default())
            }
            _ => {
                self.late_records += 1;
                None
            }
        }
    }

    /// Output of one window, held in parts (one per key group).
    fn fire(&self, start: i64, parts: Vec<JoinWindow<L, R>>, out: &mut Vec<Out>) {
        match &self.output {
            JoinOutput::Semi(output) => {
                for window in &parts {
                    for (key, left) in &window.left {
                        if window.right_keys.contains(key) {
                            out.extend(output(left, start));
                        }
                    }
                }
            }
            JoinOutput::Pairs { output, dedup } => {
                let mut seen = HashSet::<u64, IdBuildHasher>::default();
                for window in &parts {
                    for (key, left) in &window.left {
                        let Some(rights) = window.right.get(key) else {
                            continue;
                        };
                        for right in rights {
                            let Some(row) = output(left, right, start) else {
                                continue;
                            };
                            if dedup.as_ref().is_none_or(|dedup| seen.insert(dedup(&row))) {
                                out.push(row);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl<L: Data + Persist, R: Data + Persist, Out: Data> JoinOperator<L, R, Out>
    for WindowJoin<L, R, Out>
{
    fn on_left(&mut self, records: Vec<L>, _out: &mut Vec<Out>) {
        for record in records {
            let key = (self.left_side.key)(&record);
            let time_ms = (self.left_side.time)(&record);
            if let Some(window) = self.window_of(key, time_ms) {
                window.left.push((key, record));
            }
        }
    }

    fn on_right(&mut self, records: Vec<R>, _out: &mut Vec<Out>) {
        let semi = matches!(self.output, JoinOutput::Semi(_));
        for record in records {
            let key = (self.right_side.key)(&record);
            let time_ms = (self.right_side.time)(&record);
            if let Some(window) = self.window_of(key, time_ms) {
                if semi {
                    window.right_keys.insert(key);
                } else {
                    push_keyed(&mut window.right, key, record);
                }
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Out>) {
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
        let mut due: BTreeMap<(i64, i64), Vec<JoinWindow<L, R>>> = BTreeMap::new();
        take_complete(&mut self.windows, self.watermark_ms, |window, part| {
            due.entry(window).or_default().push(part)
        });
        for ((_, start), parts) in due {
            self.fire(start, parts, out);
        }
    }

    fn late_records(&self) -> u64 {
        self.late_records
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.windows)
    }
}

/// Append a record to its key's list; a new list holds exactly one (an empty
/// `Vec`'s first push would reserve four, and most keys of a join hold one record).
fn push_keyed<T>(map: &mut IdMap<u64, Vec<T>>, key: u64, record: T) {
    match map.entry(key) {
        Entry::Occupied(mut list) => list.get_mut().push(record),
        Entry::Vacant(slot) => {
            slot.insert(vec![record]);
        }
    }
}

type UnboundedPairFn<L, R, Out> = Arc<dyn Fn(&L, &R) -> Option<Out> + Send + Sync>;

/// Equi-join of the left and right inputs on their keys with no window: every
/// record is kept until the end of input, and each matching pair is output once,
/// through `output(left, right)`, when its second half arrives (in either order).
pub struct UnboundedJoin<L, R, Out> {
    left_key: KeyFn<L>,
    right_key: KeyFn<R>,
    output: UnboundedPairFn<L, R, Out>,
    left_key_unique: bool,
    /// Both inputs' records by key, in the key group of the key.
    tables: KeyGroups<JoinTables<L, R>>,
}

/// One key group of an unbounded join.
pub struct JoinTables<L, R> {
    left: IdMap<u64, Vec<L>>,
    right: IdMap<u64, Vec<R>>,
}

impl<L, R> Default for JoinTables<L, R> {
    fn default() -> Self {
        JoinTables {
            left: IdMap::default(),
            right: IdMap::default(),
        }
    }
}

impl<L, R> GroupState for JoinTables<L, R>
where
    L: Persist + Send + 'static,
    R: Persist + Send + 'static,
{
    fn is_empty(&self) -> bool {
        self.left.is_empty() && self.right.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_framed(out, |out| {
            encode_map(&self.left, out, |v, out| put_values(out, v))
        });
        put_framed(out, |out| {
            encode_map(&self.right, out, |v, out| put_values(out, v))
        });
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let left = decode_map(r.framed()?, |r| r.values())?;
        let right = decode_map(r.framed()?, |r| r.values())?;
        r.finish()?;
        Ok(JoinTables { left, right })
    }
}

impl<L: Data + Persist, R: Data + Persist, Out: Data> UnboundedJoin<L, R, Out> {
    pub fn new(
        left_key: impl Fn(&L) -> u64 + Send + Sync + 'static,
        right_key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        output: impl Fn(&L, &R) -> Option<Out> + Send + Sync + 'static,
    ) -> Self {
        Self::shared(
            Arc::new(left_key),
            Arc::new(right_key),
            Arc::new(output),
            false,
        )
    }

    fn shared(
        left_key: KeyFn<L>,
        right_key: KeyFn<R>,
        output: UnboundedPairFn<L, R, Out>,
        left_key_unique: bool,
    ) -> Self {
        UnboundedJoin {
            left_key,
            right_key,
            output,
            left_key_unique,
            tables: KeyGroups::default(),
        }
    }

    /// Promise that no two left records share a key (a primary key, as a person's
    /// id): then a right record is dropped as soon as it has met its left record,
    /// instead of being kept until the end of input.
    pub fn left_key_unique(mut self) -> Self {
        self.left_key_unique = true;
        self
    }

    /// Records held: `(left, right)`.
    pub fn held_records(&self) -> (usize, usize) {
        let tables = || self.tables.iter().map(|(_, t)| t);
        let left = tables().flat_map(|t| t.left.values()).map(Vec::len).sum();
        let right = tables().flat_map(|t| t.right.values()).map(Vec::len).sum();
        (left, right)
    }

    pub fn factory(self) -> JoinFactory<L, R, Out> {
        let UnboundedJoin {
            left_key,
            right_key,
            output,
            left_key_unique,
            ..
        } = self;
        Arc::new(move |_| {
            Box::new(Self::shared(
                left_key.clone(),
                right_key.clone(),
                output.clone(),
                left_key_unique,
            ))
        })
    }
}

impl<L: Data + Persist, R: Data + Persist, Out: Data> JoinOperator<L, R, Out>
    for UnboundedJoin<L, R, Out>
{
    fn on_left(&mut self, records: Vec<L>, out: &mut Vec<Out>) {
        for left in records {
            let key = (self.left_key)(&left);
            let tables = self.tables.for_key(key);
            if self.left_key_unique {
                debug_assert!(
                    !tables.left.contains_key(&key),
                    "a second left record of key {key}"
                );
                for right in tables.right.remove(&key).unwrap_or_default() {
                    out.extend((self.output)(&left, &right));
                }
            } else if let Some(rights) = tables.right.get(&key) {
                out.extend(
                    rights
                        .iter()
                        .filter_map(|right| (self.output)(&left, right)),
                );
            }
            push_keyed(&mut tables.left, key, left);
        }
    }

    fn on_right(&mut self, records: Vec<R>, out: &mut Vec<Out>) {
        for right in records {
            let key = (self.right_key)(&right);
            let tables = self.tables.for_key(key);
            let lefts = tables.left.get(&key);
            if let Some(lefts) = lefts {
                out.extend(lefts.iter().filter_map(|left| (self.output)(left, &right)));
            }
            if !(self.left_key_unique && lefts.is_some()) {
                push_keyed(&mut tables.right, key, right);
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, _out: &mut Vec<Out>) {
        if watermark_ms == super::END_OF_INPUT {
            for (_, tables) in self.tables.iter_mut() {
                *tables = JoinTables::default();
            }
        }
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.tables)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::state::encode_groups;
    use crate::dataflow::END_OF_INPUT;

    /// Test input: `(key, time, value)`.
    #[derive(
        Clone,
        Debug,
        PartialEq,
        Eq,
        PartialOrd,
        Ord,
        rkyv::Archive,
        rkyv::Serialize,
        rkyv::Deserialize,
    )]
    struct In {
        key: u64,
        time_ms: i64,
        value: u64,
    }

    /// Test output: `(key, window, value)`.
    #[derive(
        Clone,
        Debug,
        PartialEq,
        Eq,
        PartialOrd,
        Ord,
        rkyv::Archive,
        rkyv::Serialize,
        rkyv::Deserialize,
    )]
    struct Out {
        key: u64,
        window: Window,
        value: u64,
    }

    /// One step of a script: records on an input, or a watermark and the rows it
    /// must fire, as `(key, start, end, value)` in any order.
    enum S {
        Rec(u8, &'static [(u64, i64, u64)]),
        Wm(i64, &'static [(u64, i64, i64, u64)]),
    }
    use S::{Rec, Wm};

    fn records(part: &[(u64, i64, u64)]) -> Vec<In> {
        part.iter()
            .map(|&(key, time_ms, value)| In {
                key,
                time_ms,
                value,
            })
            .collect()
    }
    fn out(key: u64, window: Window, value: u64) -> Out {
        Out { key, window, value }
    }
    fn time(r: &In) -> i64 {
        r.time_ms
    }
    fn key(r: &In) -> u64 {
        r.key
    }
    fn side() -> Side<In> {
        Side::new(time, key)
    }

    /// Run `script` through a stage (`records(input, batch, out)`, `watermark`);
    /// records fire nothing unless `eager`, and each watermark exactly its rows.
    fn run_script(
        name: &str,
        script: &[S],
        eager: bool,
        mut on_records: impl FnMut(u8, Vec<In>, &mut Vec<Out>),
        mut on_watermark: impl FnMut(i64, &mut Vec<Out>),
    ) -> Vec<Out> {
        let mut all = Vec::new();
        for (step, s) in script.iter().enumerate() {
            let mut got = Vec::new();
            let mut expected: Vec<Out> = Vec::new();
            match s {
                Rec(input, part) => on_records(*input, records(part), &mut got),
                Wm(watermark_ms, rows) => {
                    on_watermark(*watermark_ms, &mut got);
                    expected = rows.iter().map(|&(k, s, e, v)| out(k, (s, e), v)).collect();
                }
            }
            got.sort();
            expected.sort();
            if !eager {
                assert_eq!(got, expected, "{name}: step {step}");
            }
            all.extend(got);
        }
        all
    }

    fn check(name: &str, operator: &mut dyn Operator<In, Out>, script: &[S]) {
        let operator = std::cell::RefCell::new(operator);
        run_script(
            name,
            script,
            false,
            |_, records, out| operator.borrow_mut().on_records(records, out),
            |watermark, out| operator.borrow_mut().on_watermark(watermark, out),
        );
    }

    fn check_join(name: &str, operator: &mut dyn JoinOperator<In, In, Out>, script: &[S]) {
        let operator = std::cell::RefCell::new(operator);
        run_script(
            name,
            script,
            false,
            |input, records, out| match input {
                0 => operator.borrow_mut().on_left(records, out),
                _ => operator.borrow_mut().on_right(records, out),
            },
            |watermark, out| operator.borrow_mut().on_watermark(watermark, out),
        );
    }

    fn count() -> Count<In, Out> {
        Count::new(out)
    }
    /// The largest value per key, every tie kept, as `Out` rows of its tumbling window of 10.
    fn max_value() -> MaxWithTies<In, u64, fn(&In) -> u64, Out> {
        MaxWithTies::new((|r: &In| r.value) as fn(&In) -> u64, |r: &In| {
            out(r.key, tumbling(r.time_ms, 10).expect("fits"), r.value)
        })
    }

    const TUMBLING_10: WindowSpec = WindowSpec::Tumbling { size_ms: 10 };
    const SLIDING_10_5: WindowSpec = WindowSpec::Sliding {
        size_ms: 10,
        slide_ms: 5,
    };

    #[test]
    fn window_aggregate_fires_at_window_end_per_key() {
        let cases: &[(&str, WindowSpec, &[S])] = &[
            (
                "tumbling: boundaries, keys, watermark in steps",
                TUMBLING_10,
                &[
                    Rec(0, &[(1, 0, 0), (2, 9, 0), (1, 9, 0), (1, 10, 0)]),
                    Wm(9, &[]),
                    Wm(10, &[(1, 0, 10, 2), (2, 0, 10, 1)]),
                    Rec(0, &[(2, 19, 0), (2, 25, 0)]),
                    Wm(19, &[]),
                    Wm(30, &[(1, 10, 20, 1), (2, 10, 20, 1), (2, 20, 30, 1)]),
                    Wm(40, &[]),
                ],
            ),
            (
                "tumbling: end of input fires what is left",
                TUMBLING_10,
                &[
                    Rec(0, &[(7, -1, 0), (7, 105, 0)]),
                    Wm(-1, &[]),
                    Wm(END_OF_INPUT, &[(7, -10, 0, 1), (7, 100, 110, 1)]),
                ],
            ),
            (
                "sliding: a record in every window that holds it",
                SLIDING_10_5,
                &[
                    Rec(0, &[(1, 4, 0), (1, 5, 0), (2, 12, 0)]),
                    Wm(4, &[]),
                    Wm(5, &[(1, -5, 5, 1)]),
                    Wm(10, &[(1, 0, 10, 2)]),
                    Wm(
                        END_OF_INPUT,
                        &[(1, 5, 15, 1), (2, 5, 15, 1), (2, 10, 20, 1)],
                    ),
                ],
            ),
        ];
        for (name, spec, script) in cases {
            let mut operator = WindowAggregate::new(*spec, time, key, count());
            check(name, &mut operator, script);
            assert_eq!(operator.late_records(), 0, "{name}");
        }
    }

    #[test]
    fn max_with_ties_and_top_keys() {
        let mut max = WindowAggregate::new(TUMBLING_10, time, key, max_value());
        check(
            "max with ties per key",
            &mut max,
            &[
                Rec(0, &[(1, 0, 5), (1, 1, 7), (2, 2, 3), (1, 3, 7), (1, 4, 6)]),
                Wm(END_OF_INPUT, &[(1, 0, 10, 7), (1, 0, 10, 7), (2, 0, 10, 3)]),
            ],
        );
        let mut top =
            WindowAggregate::new(TUMBLING_10, time, key, TopKeys::new(count(), |n: &u64| *n));
        check(
            "the keys with the highest count, ties included",
            &mut top,
            &[
                Rec(
                    0,
                    &[
                        (1, 0, 0),
                        (2, 1, 0),
                        (3, 2, 0),
                        (1, 3, 0),
                        (3, 4, 0),
                        (4, 12, 0),
                    ],
                ),
                Wm(10, &[(1, 0, 10, 2), (3, 0, 10, 2)]),
                Wm(END_OF_INPUT, &[(4, 10, 20, 1)]),
            ],
        );
    }

    /// Phase 1 on two partitions and phase 2 over both give the one-phase result.
    #[test]
    fn two_phases_equal_one() {
        let inputs: &[&[(u64, i64, u64)]] = &[
            &[(1, 0, 5), (2, 3, 9), (1, 12, 4)],
            &[(3, 1, 9), (1, 5, 2), (2, 11, 4)],
        ];
        let mut partials = Vec::new();
        for part in inputs {
            // One accumulator per window in phase 1 (the q7 shape: key 0), so
            // only each window's overall maximum (9, then 4) survives it.
            let mut phase_1 = WindowPartial::new(TUMBLING_10, time, |_| 0, max_value());
            phase_1.on_records(records(part), &mut Vec::new());
            phase_1.on_watermark(END_OF_INPUT, &mut partials);
        }
        let mut merge = WindowMerge::new(max_value());
        let mut got = Vec::new();
        merge.on_records(partials, &mut got);
        merge.on_watermark(END_OF_INPUT, &mut got);
        got.sort();
        let mut one_phase = WindowAggregate::new(TUMBLING_10, time, |_| 0, max_value());
        let mut expected = Vec::new();
        one_phase.on_records(
            inputs.iter().flat_map(|p| records(p)).collect(),
            &mut expected,
        );
        one_phase.on_watermark(END_OF_INPUT, &mut expected);
        expected.sort();
        assert_eq!(
            got,
            vec![
                out(1, (10, 20), 4),
                out(2, (0, 10), 9),
                out(2, (10, 20), 4),
                out(3, (0, 10), 9),
            ]
        );
        assert_eq!(got, expected);

        // Counts: partials of one key from two partitions add up.
        let mut merge = WindowMerge::new(count());
        let mut got = Vec::new();
        let partial = |key, acc| PartialRow {
            key,
            window: (0, 10),
            acc,
        };
        merge.on_records(vec![partial(1, 2), partial(1, 3), partial(2, 1)], &mut got);
        merge.on_watermark(10, &mut got);
        got.sort();
        assert_eq!(got, vec![out(1, (0, 10), 5), out(2, (0, 10), 1)]);

        // Keys complete in phase 1: the selection runs there, only leaders leave.
        let top = || TopKeys::new(count(), |n: &u64| *n);
        let mut phase_1 = WindowPartial::new(TUMBLING_10, time, key, top()).keys_complete();
        let mut leaders = Vec::new();
        phase_1.on_records(records(&[(1, 0, 0), (1, 1, 0), (2, 2, 0)]), &mut leaders);
        phase_1.on_watermark(10, &mut leaders);
        assert_eq!(leaders, vec![partial(1, 2)]);
    }

    #[test]
    fn late_records_are_counted_not_lost_silently() {
        let mut aggregate = WindowAggregate::new(SLIDING_10_5, time, key, count());
        check(
            "sliding: a late record still counts in its open windows",
            &mut aggregate,
            &[
                Wm(10, &[]),
                // Time 7: windows [0, 10) (fired: late) and [5, 15) (open).
                Rec(0, &[(1, 7, 0), (1, 12, 0)]),
                Wm(END_OF_INPUT, &[(1, 5, 15, 2), (1, 10, 20, 1)]),
            ],
        );
        assert_eq!(aggregate.late_records(), 1);
        assert_eq!(Operator::late_records(&aggregate), 1, "the engine sees it");

        let mut merge = WindowMerge::new(count());
        merge.on_watermark(10, &mut Vec::new());
        let late = PartialRow {
            key: 1,
            window: (0, 10),
            acc: 2,
        };
        merge.on_records(vec![late], &mut Vec::new());
        assert_eq!(merge.late_records(), 1);

        let mut join = WindowJoin::semi(10, side(), side(), |l: &In, s| {
            Some(out(l.key, (s, s + 10), 0))
        });
        check_join(
            "join: late record",
            &mut join,
            &[
                Wm(10, &[]),
                Rec(0, &[(1, 3, 0)]),
                Rec(1, &[(1, 4, 0)]),
                Wm(END_OF_INPUT, &[]),
            ],
        );
        assert_eq!(join.late_records(), 2);
    }

    #[test]
    fn times_whose_windows_overflow_are_late_not_wrapped() {
        let mut aggregate = WindowAggregate::new(SLIDING_10_5, time, key, count());
        check(
            "edges beyond i64",
            &mut aggregate,
            &[
                Rec(0, &[(1, i64::MAX, 0), (1, i64::MIN, 0), (1, 3, 0)]),
                Wm(END_OF_INPUT, &[(1, -5, 5, 1), (1, 0, 10, 1)]),
            ],
        );
        assert_eq!(aggregate.late_records(), 2);
        // i64::MAX is a multiple of 7: the last window that fits ends there,
        // and the end of input fires it.
        let mut aggregate =
            WindowAggregate::new(WindowSpec::Tumbling { size_ms: 7 }, time, key, count());
        check(
            "a window that ends at i64::MAX",
            &mut aggregate,
            &[
                Rec(0, &[(1, i64::MAX - 1, 0), (2, 3, 0)]),
                Wm(i64::MAX - 1, &[(2, 0, 7, 1)]),
                Wm(END_OF_INPUT, &[(1, i64::MAX - 7, i64::MAX, 1)]),
            ],
        );
        assert_eq!(aggregate.late_records(), 0);
    }

    /// Pairs as `Out { key, window, value: left * 100 + right }`.
    fn pair(left: &In, right: &In, start: i64) -> Option<Out> {
        Some(out(
            left.key,
            (start, start + 10),
            left.value * 100 + right.value,
        ))
    }

    #[test]
    fn window_join_in_both_arrival_orders() {
        type Case = (&'static str, bool, &'static [S]);
        let cases: &[Case] = &[
            (
                "left first",
                false,
                &[
                    Rec(0, &[(1, 0, 1), (2, 1, 2), (1, 12, 3)]),
                    Rec(1, &[(1, 5, 7), (1, 9, 8), (2, 10, 9), (1, 19, 6)]),
                    Wm(9, &[]),
                    Wm(10, &[(1, 0, 10, 107), (1, 0, 10, 108)]),
                    Wm(END_OF_INPUT, &[(1, 10, 20, 306)]),
                ],
            ),
            (
                "right first",
                false,
                &[
                    Rec(1, &[(1, 5, 7), (1, 9, 8), (2, 10, 9), (1, 19, 6)]),
                    Rec(0, &[(1, 0, 1), (2, 1, 2), (1, 12, 3)]),
                    Wm(10, &[(1, 0, 10, 107), (1, 0, 10, 108)]),
                    Wm(END_OF_INPUT, &[(1, 10, 20, 306)]),
                ],
            ),
            (
                "dedup: one row per left key and window",
                true,
                &[
                    Rec(1, &[(1, 5, 7), (1, 9, 8), (1, 19, 6)]),
                    Rec(0, &[(1, 0, 1), (1, 12, 3)]),
                    Wm(END_OF_INPUT, &[(1, 0, 10, 107), (1, 10, 20, 306)]),
                ],
            ),
        ];
        for (name, dedup, script) in cases {
            let mut join = WindowJoin::new(10, side(), side(), pair);
            if *dedup {
                // The dedup key is the output's key; the first pair made wins, and
                // within a key left and right records keep their arrival order.
                join = join.dedup(|o: &Out| o.key);
            }
            check_join(name, &mut join, script);
        }
        for (name, script) in [
            (
                "semi, left first",
                &[
                    Rec(0, &[(1, 0, 1), (2, 1, 2)]),
                    Rec(1, &[(1, 5, 7), (1, 6, 8), (2, 15, 0)]),
                    Wm(END_OF_INPUT, &[(1, 0, 10, 1)]),
                ] as &[S],
            ),
            (
                "semi, right first",
                &[
                    Rec(1, &[(1, 5, 7), (1, 6, 8), (2, 15, 0)]),
                    Rec(0, &[(1, 0, 1), (2, 1, 2)]),
                    Wm(END_OF_INPUT, &[(1, 0, 10, 1)]),
                ],
            ),
        ] {
            let mut join = WindowJoin::semi(10, side(), side(), |left: &In, start| {
                Some(out(left.key, (start, start + 10), left.value))
            });
            check_join(name, &mut join, script);
        }
    }

    #[test]
    fn unbounded_join_emits_each_pair_once_in_either_order() {
        let pair =
            |left: &In, right: &In| Some(out(left.key, (0, 0), left.value * 100 + right.value));
        type Case = (&'static str, bool, &'static [S]);
        // No windows: every pair comes out as its second half arrives.
        let cases: &[Case] = &[
            (
                "left first",
                false,
                &[
                    Rec(0, &[(1, 0, 1), (2, 0, 2)]),
                    Rec(1, &[(1, 0, 7), (1, 0, 8), (3, 0, 9)]),
                ],
            ),
            (
                "right first",
                false,
                &[
                    Rec(1, &[(1, 0, 7), (1, 0, 8), (3, 0, 9)]),
                    Rec(0, &[(1, 0, 1), (2, 0, 2)]),
                ],
            ),
            (
                "interleaved, left unique",
                true,
                &[
                    Rec(1, &[(1, 0, 7)]),
                    Rec(0, &[(1, 0, 1), (2, 0, 2)]),
                    Rec(1, &[(1, 0, 8), (3, 0, 9)]),
                ],
            ),
        ];
        for (name, unique, script) in cases {
            let mut join = UnboundedJoin::new(key, key, pair);
            if *unique {
                join = join.left_key_unique();
            }
            let join = std::cell::RefCell::new(join);
            let mut got = run_script(
                name,
                script,
                true,
                |input, records, out| match input {
                    0 => join.borrow_mut().on_left(records, out),
                    _ => join.borrow_mut().on_right(records, out),
                },
                |_, _| {},
            );
            let mut join = join.into_inner();
            // Both sides held (or, left unique, only unmatched rights).
            let held = if *unique { (2, 1) } else { (2, 3) };
            assert_eq!(join.held_records(), held, "{name}");
            join.on_watermark(END_OF_INPUT, &mut got);
            got.sort();
            assert_eq!(
                got,
                vec![out(1, (0, 0), 107), out(1, (0, 0), 108)],
                "{name}"
            );
            assert_eq!(
                join.held_records(),
                (0, 0),
                "{name}: end of input frees the state"
            );
        }
    }

    /// A seeded generator of numbers below a bound (xorshift).
    fn xorshift(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut rng = seed.max(1);
        move |bound| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % bound
        }
    }

    /// Under `records` records of `keys` keys, time moving on by under
    /// `step` ms a record and each record up to `lag` ms behind it.
    fn disordered(
        next: &mut impl FnMut(u64) -> u64,
        max_time: &mut i64,
        (records, keys, step, lag): (u64, u64, u64, u64),
    ) -> Vec<In> {
        (0..next(records))
            .map(|_| {
                *max_time += next(step) as i64;
                In {
                    key: next(keys),
                    time_ms: *max_time - next(lag) as i64,
                    value: 0,
                }
            })
            .collect()
    }

    /// A windowed count kept key first, fed records out of time order, with
    /// its state encoded, decoded into a fresh operator and the run continued
    /// at one point: every watermark fires exactly what a plain count by
    /// `(window, key)` fires, and the late records are the same.
    #[test]
    fn key_first_windows_equal_a_plain_count_under_disorder_and_restore() {
        let spec = WindowSpec::Sliding {
            size_ms: 20,
            slide_ms: 5,
        };
        for seed in 1..=6u64 {
            let mut next = xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut operator = WindowAggregate::new(spec, time, key, count());
            let (mut plain, mut plain_late) = (BTreeMap::<(i64, i64, u64), u64>::new(), 0);
            let (mut watermark, mut max_time) = (i64::MIN, 0i64);
            let restore_at = 20 + next(40);
            for step in 0..80 {
                // A batch of records, some behind the watermark (late).
                let batch = disordered(&mut next, &mut max_time, (30, 12, 3, 25));
                for record in &batch {
                    let mut late = false;
                    spec.for_each(record.time_ms, |(start, end)| {
                        if complete(end, watermark) {
                            late = true;
                        } else {
                            *plain.entry((end, start, record.key)).or_default() += 1;
                        }
                    });
                    plain_late += late as u64;
                }
                operator.on_records(batch, &mut Vec::new());
                watermark = watermark.max(max_time - 15);
                let mut got = Vec::new();
                operator.on_watermark(watermark, &mut got);
                let mut expected = Vec::new();
                while let Some(entry) = plain.first_entry() {
                    let &(end, start, key) = entry.key();
                    if !complete(end, watermark) {
                        break;
                    }
                    expected.push(out(key, (start, end), entry.remove()));
                }
                got.sort();
                expected.sort();
                assert_eq!(got, expected, "seed {seed}, step {step}");
                if step == restore_at {
                    let state = operator.state().expect("keeps state");
                    let groups = encode_groups(state, &state.non_empty());
                    let late = operator.late_records();
                    operator = WindowAggregate::new(spec, time, key, count());
                    let fresh = operator.state().expect("keeps state");
                    fresh.init(crate::dataflow::KEY_GROUPS_DEFAULT);
                    for (group, bytes) in &groups {
                        fresh.restore(*group, bytes).expect("restores");
                    }
                    operator.state.late_records = late;
                    let mut refired = Vec::new();
                    operator.on_watermark(watermark, &mut refired);
                    assert!(refired.is_empty(), "seed {seed}: fired twice");
                }
            }
            assert!(plain_late > 0, "seed {seed}: the input had late records");
            assert_eq!(operator.late_records(), plain_late, "seed {seed}");
            let mut rest = Vec::new();
            operator.on_watermark(END_OF_INPUT, &mut rest);
            assert_eq!(rest.len(), plain.len(), "seed {seed}: end of input");
        }
    }

    /// What a key-first group decodes: a bad encoding is an error naming it.
    #[test]
    fn key_first_windows_reject_bad_encodings() {
        let encode = |entries: &[(u64, &[(i64, u64)])]| {
            let mut bytes = Vec::new();
            put_u32(&mut bytes, entries.len() as u32);
            for (key, windows) in entries {
                put_u64(&mut bytes, *key);
                put_u32(&mut bytes, windows.len() as u32);
                for (end, acc) in *windows {
                    put_u64(&mut bytes, *end as u64);
                    acc.persist(&mut bytes);
                }
            }
            bytes
        };
        let good = encode(&[(7, &[(10, 3), (15, 1)]), (9, &[(20, 2)])]);
        let state = KeyWindows::<u64>::decode(&good).expect("decodes");
        assert_eq!(state.next_end, 10);
        let mut again = Vec::new();
        state.encode(&mut again);
        let state = KeyWindows::<u64>::decode(&again).expect("decodes its own encoding");
        assert_eq!(state.keys[&7], vec![(10, 3), (15, 1)]);
        let cases: &[(&str, Vec<u8>, &str)] = &[
            (
                "windows out of order",
                encode(&[(7, &[(15, 1), (10, 3)])]),
                "out of order",
            ),
            ("a key with no window", encode(&[(7, &[])]), "no window"),
            (
                "a key twice",
                encode(&[(7, &[(10, 3)]), (7, &[(15, 1)])]),
                "held twice",
            ),
            ("truncated", good[..good.len() - 3].to_vec(), "ends at byte"),
        ];
        for (name, bytes, error) in cases {
            match KeyWindows::<u64>::decode(bytes) {
                Ok(_) => panic!("{name}: decoded"),
                Err(e) => assert!(e.contains(error), "{name}: {e}"),
            }
        }
    }

    /// A fire a few keys at a time gives, window by window, what a fire at
    /// once gives, with records taken between its steps (they belong to
    /// later windows), and `firing` says when it is done.
    #[test]
    fn a_window_fired_in_steps_gives_what_one_step_gives() {
        let spec = WindowSpec::Sliding {
            size_ms: 20,
            slide_ms: 5,
        };
        let mut next = xorshift(7);
        let mut at_once = WindowAggregate::new(spec, time, key, count());
        let mut stepped = WindowAggregate::new(spec, time, key, count()).fire_step_keys(3);
        let mut max_time = 0i64;
        let mut steps = 0;
        for round in 0..60 {
            let batch = disordered(&mut next, &mut max_time, (40, 30, 2, 10));
            at_once.on_records(batch.clone(), &mut Vec::new());
            stepped.on_records(batch, &mut Vec::new());
            let watermark = if round == 59 {
                END_OF_INPUT
            } else {
                max_time - 12
            };
            let (mut want, mut got) = (Vec::new(), Vec::new());
            at_once.on_watermark(watermark, &mut want);
            assert!(!at_once.firing(), "round {round}");
            stepped.on_watermark(watermark, &mut got);
            let probe = In {
                key: round,
                time_ms: max_time,
                value: 0,
            };
            let mut probed = false;
            while stepped.firing() {
                steps += 1;
                if !probed && watermark != END_OF_INPUT {
                    // A record between two steps: for later windows only.
                    stepped.on_records(vec![probe.clone()], &mut Vec::new());
                    probed = true;
                }
                assert!(stepped.fire_more(&mut got) != stepped.firing());
            }
            if probed {
                at_once.on_records(vec![probe], &mut Vec::new());
            }
            // In window order; within a window, keys in any order.
            let order = |rows: &[Out]| rows.iter().map(|r| r.window).collect::<Vec<_>>();
            assert!(order(&got).is_sorted(), "round {round}: {got:?}");
            assert_eq!(order(&got), order(&want), "round {round}");
            got.sort();
            want.sort();
            assert_eq!(got, want, "round {round}");
        }
        assert!(steps > 100, "the fires took {steps} extra steps");
        assert_eq!(stepped.late_records(), at_once.late_records());
    }
}

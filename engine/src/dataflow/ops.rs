//! Library operators: keyed windowed aggregation and joins, so that a job says what
//! it computes and not how windows are kept and fired.
//!
//! Every operator here is an ordinary [`Operator`] used through
//! `KeyedStream::process` or `KeyedStream::join` (each has a `factory()` that
//! builds a fresh partition from shared configuration); none needs anything from
//! the engine that a hand-written operator could not have. They are separate from
//! `graph.rs` because they are policy (which state, when to fire), not plumbing.
//!
//! | operator | state | fires |
//! |---|---|---|
//! | [`WindowAggregate`] | `(window_end, window_start) -> key -> Acc` | every window with `end <= watermark`, in window order |
//! | [`WindowMerge`] | same, from partial accumulators carried by records | same |
//! | [`WindowJoin`] | `window_start -> key -> records` of both inputs | a window at its end |
//! | [`UnboundedJoin`] | `key -> records` of both inputs, until end of input | a pair as soon as both halves are in |
//!
//! **Aggregates.** An [`Aggregate`] folds records into an accumulator per key and
//! window and turns it into output records when the window fires. One that says
//! `MERGEABLE` promises that `merge` is associative and commutative and that merging
//! the accumulators of two disjoint sets of records equals folding their union; only
//! such an aggregate may run in two phases.
//!
//! **Two phases.** A stage carries one record type `R`, so a partial accumulator
//! has to travel between the phases as records of `R`: [`Partial`] adds the codec
//! (`encode` in phase 1, `decode` in phase 2, `window_of` to partition
//! phase 2 by window). Phase 1 is [`WindowAggregate::partial`] (it emits every
//! key's partial); phase 2 is [`WindowMerge`], keyed by window, which decodes,
//! merges by key and emits the final records. The ready-made aggregates use their
//! final output row as their partial row (a count row, or a row that ties the
//! maximum), so they encode for free; an aggregate whose partial differs from its
//! result (an average: sum and count) needs a row variant of its own.
//!
//! When the stage is keyed by the aggregate's key, every key's accumulator is
//! already complete in phase 1, and phase 1 may use [`WindowAggregate::new`] and
//! emit its final (possibly selected, see [`TopKeys`]) rows; q5 does that so that
//! only each partition's leading auctions cross the network.
//!
//! **Late records.** Sources emit in time order and a stage's watermark is the
//! minimum of its inputs, so a record can never belong to a window that has already
//! fired. If one does, it is not silently lost: the operator counts it
//! (`late_records()`) and, unless told to expect disorder (`expect_in_order(false)`),
//! fails a debug assertion.
//!
//! **State is what the input holds.** The joins keep records as they arrive; a
//! job that needs only a few fields of a wide record should project it with a
//! `map` before the join (a fused step, so it costs no stage): q3 and q8 keep a
//! person as its output row, not as the whole person, and q3 an auction as its
//! id and seller.
//!
//! **Costs.** Per record: one call of the time and key functions (dynamic), one
//! B-tree lookup per window the record falls in, one hash lookup (the id hasher)
//! and the aggregate's `add`. Window joins hold every record of an open window
//! (the semi-join only the keys of its second input); the unbounded join holds
//! both inputs until the end of input, except that with `left_key_unique` a right
//! record is dropped once it has met its left partner.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::sync::Arc;

use super::graph::{KeyFn, Operator, OperatorFactory};
use super::window::{complete, sliding, tumbling};
use crate::ids::{IdBuildHasher, IdMap};

/// A window as `(start, end)`, half-open, in ms of event time.
pub type Window = (i64, i64);

/// The event time of a record, in ms.
pub type TimeFn<R> = Arc<dyn Fn(&R) -> i64 + Send + Sync>;

/// Accumulators of one window, by key.
pub type Accs<A> = IdMap<u64, A>;

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

    /// Call `f` with every window that holds `time_ms`, earliest first.
    #[inline]
    fn for_each(&self, time_ms: i64, mut f: impl FnMut(Window)) {
        match *self {
            WindowSpec::Tumbling { size_ms } => f(tumbling(time_ms, size_ms)),
            WindowSpec::Sliding { size_ms, slide_ms } => {
                sliding(time_ms, size_ms, slide_ms).for_each(f)
            }
        }
    }
}

/// Folds records into an accumulator per key and window.
pub trait Aggregate<R>: Send + Sync + 'static {
    type Acc: Send + Clone + 'static;
    /// `merge` is associative and commutative, and merging the accumulators of two
    /// disjoint sets of records equals adding their union: the aggregate may run in
    /// two phases ([`WindowAggregate::partial`], [`WindowMerge`]).
    const MERGEABLE: bool;

    fn new_acc(&self) -> Self::Acc;
    fn add(&self, acc: &mut Self::Acc, record: &R);
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc);
    /// The output records of one key's accumulator when its window fires.
    fn emit(&self, key: u64, window: Window, acc: Self::Acc, out: &mut Vec<R>);
    /// The output of a whole fired window; by default `emit` per key (in no
    /// particular key order). Override to select across keys (see [`TopKeys`]).
    fn emit_window(&self, window: Window, accs: Accs<Self::Acc>, out: &mut Vec<R>) {
        for (key, acc) in accs {
            self.emit(key, window, acc, out);
        }
    }
}

/// How a mergeable aggregate's partial accumulators travel as records between the
/// two phases.
pub trait Partial<R>: Aggregate<R> {
    /// Phase 1: one key's partial accumulator of `window`, as records.
    fn encode(&self, key: u64, window: Window, acc: Self::Acc, out: &mut Vec<R>);
    /// Phase 2: the partial a record carries, or `None` if it carries none.
    fn decode(&self, record: R) -> Option<(u64, Window, Self::Acc)>;
    /// The window a partial record belongs to (phase 2 is partitioned by it).
    fn window_of(&self, record: &R) -> Option<Window>;
}

type CountOutputFn<R> = Arc<dyn Fn(u64, Window, u64) -> R + Send + Sync>;
type CountParseFn<R> = Arc<dyn Fn(&R) -> Option<(u64, Window, u64)> + Send + Sync>;

/// Records per key and window; emits `output(key, window, count)`.
pub struct Count<R> {
    output: CountOutputFn<R>,
    parse: Option<CountParseFn<R>>,
}

impl<R> Count<R> {
    /// A one-phase count.
    pub fn new(output: impl Fn(u64, Window, u64) -> R + Send + Sync + 'static) -> Self {
        Count {
            output: Arc::new(output),
            parse: None,
        }
    }

    /// A count that can also run in two phases: its output rows are its partials,
    /// and `parse` reads `(key, window, count)` back from one.
    pub fn two_phase(
        output: impl Fn(u64, Window, u64) -> R + Send + Sync + 'static,
        parse: impl Fn(&R) -> Option<(u64, Window, u64)> + Send + Sync + 'static,
    ) -> Self {
        Count {
            output: Arc::new(output),
            parse: Some(Arc::new(parse)),
        }
    }

    fn parse(&self, record: &R) -> Option<(u64, Window, u64)> {
        let parse = self
            .parse
            .as_ref()
            .expect("a Count in two phases needs Count::two_phase");
        parse(record)
    }
}

impl<R: 'static> Aggregate<R> for Count<R> {
    type Acc = u64;
    const MERGEABLE: bool = true;

    fn new_acc(&self) -> u64 {
        0
    }
    #[inline]
    fn add(&self, acc: &mut u64, _record: &R) {
        *acc += 1;
    }
    fn merge(&self, acc: &mut u64, other: u64) {
        *acc += other;
    }
    fn emit(&self, key: u64, window: Window, acc: u64, out: &mut Vec<R>) {
        out.push((self.output)(key, window, acc));
    }
}

impl<R: 'static> Partial<R> for Count<R> {
    fn encode(&self, key: u64, window: Window, acc: u64, out: &mut Vec<R>) {
        self.emit(key, window, acc, out);
    }
    fn decode(&self, record: R) -> Option<(u64, Window, u64)> {
        self.parse(&record)
    }
    fn window_of(&self, record: &R) -> Option<Window> {
        self.parse(record).map(|(_, window, _)| window)
    }
}

type KeepFn<R> = Arc<dyn Fn(&R) -> R + Send + Sync>;
type MaxParseFn<R, V> = Arc<dyn Fn(&R) -> Option<(u64, Window, V)> + Send + Sync>;

/// Every record that ties the maximum of `value` per key and window: keeps
/// `keep(record)` (the output row) of each, and emits them all.
pub struct MaxWithTies<R, V, F> {
    value: F,
    keep: KeepFn<R>,
    parse: Option<MaxParseFn<R, V>>,
    _value: PhantomData<fn() -> V>,
}

impl<R, V, F: Fn(&R) -> V> MaxWithTies<R, V, F> {
    /// A one-phase maximum.
    pub fn new(value: F, keep: impl Fn(&R) -> R + Send + Sync + 'static) -> Self {
        MaxWithTies {
            value,
            keep: Arc::new(keep),
            parse: None,
            _value: PhantomData,
        }
    }

    /// A maximum that can also run in two phases: kept rows are its partials, and
    /// `parse` reads `(key, window, value)` back from one.
    pub fn two_phase(
        value: F,
        keep: impl Fn(&R) -> R + Send + Sync + 'static,
        parse: impl Fn(&R) -> Option<(u64, Window, V)> + Send + Sync + 'static,
    ) -> Self {
        MaxWithTies {
            value,
            keep: Arc::new(keep),
            parse: Some(Arc::new(parse)),
            _value: PhantomData,
        }
    }

    fn parse(&self, record: &R) -> Option<(u64, Window, V)> {
        let parse = self
            .parse
            .as_ref()
            .expect("a MaxWithTies in two phases needs MaxWithTies::two_phase");
        parse(record)
    }
}

impl<R, V, F> Aggregate<R> for MaxWithTies<R, V, F>
where
    R: Clone + Send + 'static,
    V: Ord + Clone + Send + 'static,
    F: Fn(&R) -> V + Send + Sync + 'static,
{
    /// The maximum so far and the kept rows that reach it.
    type Acc = Option<(V, Vec<R>)>;
    const MERGEABLE: bool = true;

    fn new_acc(&self) -> Self::Acc {
        None
    }
    #[inline]
    fn add(&self, acc: &mut Self::Acc, record: &R) {
        let value = (self.value)(record);
        match acc {
            Some((best, rows)) if value == *best => rows.push((self.keep)(record)),
            Some((best, _)) if value < *best => {}
            _ => *acc = Some((value, vec![(self.keep)(record)])),
        }
    }
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc) {
        let Some((value, other_rows)) = other else {
            return;
        };
        match acc {
            Some((best, rows)) if value == *best => rows.extend(other_rows),
            Some((best, _)) if value < *best => {}
            _ => *acc = Some((value, other_rows)),
        }
    }
    fn emit(&self, _key: u64, _window: Window, acc: Self::Acc, out: &mut Vec<R>) {
        if let Some((_, rows)) = acc {
            out.extend(rows);
        }
    }
}

impl<R, V, F> Partial<R> for MaxWithTies<R, V, F>
where
    R: Clone + Send + 'static,
    V: Ord + Clone + Send + 'static,
    F: Fn(&R) -> V + Send + Sync + 'static,
{
    fn encode(&self, key: u64, window: Window, acc: Self::Acc, out: &mut Vec<R>) {
        self.emit(key, window, acc, out);
    }
    fn decode(&self, record: R) -> Option<(u64, Window, Self::Acc)> {
        let (key, window, value) = self.parse(&record)?;
        Some((key, window, Some((value, vec![record]))))
    }
    fn window_of(&self, record: &R) -> Option<Window> {
        self.parse(record).map(|(_, window, _)| window)
    }
}

/// Wraps an aggregate so that a fired window emits only the keys whose
/// accumulator ranks highest under `rank`, ties included ("the auctions with the
/// most bids"). Adding, merging and the partial codec are the inner aggregate's.
pub struct TopKeys<A, F> {
    inner: A,
    rank: F,
}

impl<A, F> TopKeys<A, F> {
    pub fn new(inner: A, rank: F) -> Self {
        TopKeys { inner, rank }
    }
}

impl<R, A, F, V> Aggregate<R> for TopKeys<A, F>
where
    A: Aggregate<R>,
    F: Fn(&A::Acc) -> V + Send + Sync + 'static,
    V: Ord,
{
    type Acc = A::Acc;
    const MERGEABLE: bool = A::MERGEABLE;

    fn new_acc(&self) -> A::Acc {
        self.inner.new_acc()
    }
    #[inline]
    fn add(&self, acc: &mut A::Acc, record: &R) {
        self.inner.add(acc, record);
    }
    fn merge(&self, acc: &mut A::Acc, other: A::Acc) {
        self.inner.merge(acc, other);
    }
    fn emit(&self, key: u64, window: Window, acc: A::Acc, out: &mut Vec<R>) {
        self.inner.emit(key, window, acc, out);
    }
    fn emit_window(&self, window: Window, accs: Accs<A::Acc>, out: &mut Vec<R>) {
        let Some(best) = accs.values().map(&self.rank).max() else {
            return;
        };
        for (key, acc) in accs {
            if (self.rank)(&acc) == best {
                self.inner.emit(key, window, acc, out);
            }
        }
    }
}

impl<R, A, F, V> Partial<R> for TopKeys<A, F>
where
    A: Partial<R>,
    F: Fn(&A::Acc) -> V + Send + Sync + 'static,
    V: Ord,
{
    fn encode(&self, key: u64, window: Window, acc: A::Acc, out: &mut Vec<R>) {
        self.inner.encode(key, window, acc, out);
    }
    fn decode(&self, record: R) -> Option<(u64, Window, A::Acc)> {
        self.inner.decode(record)
    }
    fn window_of(&self, record: &R) -> Option<Window> {
        self.inner.window_of(record)
    }
}

/// Open windows by `(end, start)`, so that the first entry is the next to fire.
type Windows<Acc> = BTreeMap<(i64, i64), Accs<Acc>>;

/// How a fired window leaves: final records, or partials for a [`WindowMerge`].
type FireFn<R, A> = fn(&A, Window, Accs<<A as Aggregate<R>>::Acc>, &mut Vec<R>);

fn fire_partials<R, A: Partial<R>>(
    aggregate: &A,
    window: Window,
    accs: Accs<A::Acc>,
    out: &mut Vec<R>,
) {
    for (key, acc) in accs {
        aggregate.encode(key, window, acc, out);
    }
}

/// Remove and emit, in window order, every window whose end the watermark reached.
fn fire_complete<R, A: Aggregate<R>>(
    windows: &mut Windows<A::Acc>,
    watermark_ms: i64,
    aggregate: &A,
    fire: FireFn<R, A>,
    out: &mut Vec<R>,
) {
    while let Some(entry) = windows.first_entry() {
        let (end, start) = *entry.key();
        if !complete(end, watermark_ms) {
            break;
        }
        fire(aggregate, (start, end), entry.remove(), out);
    }
}

/// Keyed windowed aggregation: per window of `spec` and per `key(record)`, an
/// accumulator of `A`; every window fires once, when the watermark reaches its end.
pub struct WindowAggregate<R, A: Aggregate<R>> {
    spec: WindowSpec,
    time: TimeFn<R>,
    key: KeyFn<R>,
    aggregate: Arc<A>,
    fire: FireFn<R, A>,
    expect_in_order: bool,
    windows: Windows<A::Acc>,
    watermark_ms: i64,
    late_records: u64,
}

impl<R: Send + 'static, A: Aggregate<R>> WindowAggregate<R, A> {
    /// Emits `A::emit_window` of every window as it fires.
    pub fn new(
        spec: WindowSpec,
        time: impl Fn(&R) -> i64 + Send + Sync + 'static,
        key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Self {
        Self::with_fire(
            spec,
            Arc::new(time),
            Arc::new(key),
            Arc::new(aggregate),
            A::emit_window,
        )
    }

    /// Phase 1 of two: emits every key's partial (`A::encode`) as its window fires.
    pub fn partial(
        spec: WindowSpec,
        time: impl Fn(&R) -> i64 + Send + Sync + 'static,
        key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Self
    where
        A: Partial<R>,
    {
        Self::partial_shared(spec, Arc::new(time), Arc::new(key), Arc::new(aggregate))
    }

    pub(crate) fn partial_shared(
        spec: WindowSpec,
        time: TimeFn<R>,
        key: KeyFn<R>,
        aggregate: Arc<A>,
    ) -> Self
    where
        A: Partial<R>,
    {
        const {
            assert!(
                A::MERGEABLE,
                "only a mergeable aggregate runs in two phases"
            )
        };
        Self::with_fire(spec, time, key, aggregate, fire_partials::<R, A>)
    }

    fn with_fire(
        spec: WindowSpec,
        time: TimeFn<R>,
        key: KeyFn<R>,
        aggregate: Arc<A>,
        fire: FireFn<R, A>,
    ) -> Self {
        spec.assert_valid();
        WindowAggregate {
            spec,
            time,
            key,
            aggregate,
            fire,
            expect_in_order: true,
            windows: BTreeMap::new(),
            watermark_ms: i64::MIN,
            late_records: 0,
        }
    }

    /// `false`: late records are only counted, with no debug assertion (for inputs
    /// that may be out of order, and for tests of the count).
    pub fn expect_in_order(mut self, in_order: bool) -> Self {
        self.expect_in_order = in_order;
        self
    }

    /// Records that fell in a window that had already fired (in that window they
    /// were not counted; windows still open did take them).
    pub fn late_records(&self) -> u64 {
        self.late_records
    }

    /// The stage's operator factory: every partition starts empty, with this
    /// configuration.
    pub fn factory(self) -> OperatorFactory<R> {
        let WindowAggregate {
            spec,
            time,
            key,
            aggregate,
            fire,
            expect_in_order,
            ..
        } = self;
        Arc::new(move |_| {
            let fresh = Self::with_fire(spec, time.clone(), key.clone(), aggregate.clone(), fire);
            Box::new(fresh.expect_in_order(expect_in_order))
        })
    }
}

impl<R: Send + 'static, A: Aggregate<R>> Operator<R> for WindowAggregate<R, A> {
    fn on_records(&mut self, _input: u8, records: Vec<R>, _out: &mut Vec<R>) {
        let watermark_ms = self.watermark_ms;
        let aggregate = &*self.aggregate;
        let windows = &mut self.windows;
        for record in &records {
            let key = (self.key)(record);
            let mut late = false;
            self.spec.for_each((self.time)(record), |(start, end)| {
                if complete(end, watermark_ms) {
                    late = true;
                    return;
                }
                let acc = windows
                    .entry((end, start))
                    .or_default()
                    .entry(key)
                    .or_insert_with(|| aggregate.new_acc());
                aggregate.add(acc, record);
            });
            if late {
                self.late_records += 1;
                debug_assert!(
                    !self.expect_in_order,
                    "a record behind the watermark {watermark_ms}"
                );
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<R>) {
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
        fire_complete(
            &mut self.windows,
            self.watermark_ms,
            &*self.aggregate,
            self.fire,
            out,
        );
    }
}

/// Phase 2 of a two-phase aggregation: decodes partials (`A::decode`), merges
/// them per window and key, and emits `A::emit_window` when the window fires. Key
/// its input by window (`Partial::window_of`) so that a window's partials meet.
/// Records that carry no partial are ignored.
pub struct WindowMerge<R, A: Aggregate<R>> {
    aggregate: Arc<A>,
    expect_in_order: bool,
    windows: Windows<A::Acc>,
    watermark_ms: i64,
    late_records: u64,
}

impl<R: Send + 'static, A: Partial<R>> WindowMerge<R, A> {
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
            expect_in_order: true,
            windows: BTreeMap::new(),
            watermark_ms: i64::MIN,
            late_records: 0,
        }
    }

    /// As [`WindowAggregate::expect_in_order`].
    pub fn expect_in_order(mut self, in_order: bool) -> Self {
        self.expect_in_order = in_order;
        self
    }

    /// Partials of a window that had already fired (dropped, counted).
    pub fn late_records(&self) -> u64 {
        self.late_records
    }

    pub fn factory(self) -> OperatorFactory<R> {
        let (aggregate, expect_in_order) = (self.aggregate, self.expect_in_order);
        Arc::new(move |_| {
            Box::new(Self::shared(aggregate.clone()).expect_in_order(expect_in_order))
        })
    }
}

impl<R: Send + 'static, A: Partial<R>> Operator<R> for WindowMerge<R, A> {
    fn on_records(&mut self, _input: u8, records: Vec<R>, _out: &mut Vec<R>) {
        for record in records {
            let Some((key, (start, end), acc)) = self.aggregate.decode(record) else {
                continue;
            };
            if complete(end, self.watermark_ms) {
                self.late_records += 1;
                debug_assert!(
                    !self.expect_in_order,
                    "a partial behind the watermark {}",
                    self.watermark_ms
                );
                continue;
            }
            match self.windows.entry((end, start)).or_default().entry(key) {
                Entry::Occupied(mut slot) => self.aggregate.merge(slot.get_mut(), acc),
                Entry::Vacant(slot) => {
                    slot.insert(acc);
                }
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<R>) {
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
        fire_complete(
            &mut self.windows,
            self.watermark_ms,
            &*self.aggregate,
            A::emit_window,
            out,
        );
    }
}

type PairFn<R> = Arc<dyn Fn(&R, &R, i64) -> Option<R> + Send + Sync>;
type SemiFn<R> = Arc<dyn Fn(&R, i64) -> Option<R> + Send + Sync>;

/// What a window join makes of a fired window.
enum JoinOutput<R> {
    /// `output(left, right, window_start)` for every pair with equal keys; with a
    /// dedup key, one output row per dedup key and window.
    Pairs {
        output: PairFn<R>,
        dedup: Option<KeyFn<R>>,
    },
    /// `output(left, window_start)` for every left record with at least one right
    /// record of its key; only the right keys are kept.
    Semi(SemiFn<R>),
}

impl<R> Clone for JoinOutput<R> {
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

struct JoinWindow<R> {
    /// Left records with their keys, in arrival order (only looked up by the right).
    left: Vec<(u64, R)>,
    right: IdMap<u64, Vec<R>>,
    right_keys: HashSet<u64, IdBuildHasher>,
}

impl<R> Default for JoinWindow<R> {
    fn default() -> Self {
        JoinWindow {
            left: Vec::new(),
            right: IdMap::default(),
            right_keys: HashSet::default(),
        }
    }
}

/// Tumbling-window equi-join of input 0 (left) and input 1 (right) on `key`
/// (the stage's key): a left and a right record meet if they have the same key and
/// fall in the same window; the window's output is made when it fires.
pub struct WindowJoin<R> {
    size_ms: i64,
    time: TimeFn<R>,
    key: KeyFn<R>,
    output: JoinOutput<R>,
    expect_in_order: bool,
    windows: BTreeMap<i64, JoinWindow<R>>,
    watermark_ms: i64,
    late_records: u64,
}

impl<R: Send + 'static> WindowJoin<R> {
    /// Every matching pair, through `output(left, right, window_start)`.
    pub fn new(
        size_ms: i64,
        time: impl Fn(&R) -> i64 + Send + Sync + 'static,
        key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        output: impl Fn(&R, &R, i64) -> Option<R> + Send + Sync + 'static,
    ) -> Self {
        let output = JoinOutput::Pairs {
            output: Arc::new(output),
            dedup: None,
        };
        Self::with_output(size_ms, Arc::new(time), Arc::new(key), output)
    }

    /// A semi-join: `output(left, window_start)` once for every left record that
    /// has a right record of its key in its window. Keeps only the right keys.
    pub fn semi(
        size_ms: i64,
        time: impl Fn(&R) -> i64 + Send + Sync + 'static,
        key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        output: impl Fn(&R, i64) -> Option<R> + Send + Sync + 'static,
    ) -> Self {
        Self::with_output(
            size_ms,
            Arc::new(time),
            Arc::new(key),
            JoinOutput::Semi(Arc::new(output)),
        )
    }

    /// Emit one output row per `dedup(row)` and window (the first made).
    /// Has no effect on a semi-join, which emits once per left record already.
    pub fn dedup(mut self, dedup: impl Fn(&R) -> u64 + Send + Sync + 'static) -> Self {
        if let JoinOutput::Pairs { dedup: slot, .. } = &mut self.output {
            *slot = Some(Arc::new(dedup));
        }
        self
    }

    fn with_output(size_ms: i64, time: TimeFn<R>, key: KeyFn<R>, output: JoinOutput<R>) -> Self {
        assert!(size_ms > 0, "window size must be > 0");
        WindowJoin {
            size_ms,
            time,
            key,
            output,
            expect_in_order: true,
            windows: BTreeMap::new(),
            watermark_ms: i64::MIN,
            late_records: 0,
        }
    }

    /// As [`WindowAggregate::expect_in_order`].
    pub fn expect_in_order(mut self, in_order: bool) -> Self {
        self.expect_in_order = in_order;
        self
    }

    /// Records of a window that had already fired (dropped, counted).
    pub fn late_records(&self) -> u64 {
        self.late_records
    }

    pub fn factory(self) -> OperatorFactory<R> {
        let WindowJoin {
            size_ms,
            time,
            key,
            output,
            expect_in_order,
            ..
        } = self;
        Arc::new(move |_| {
            let fresh = Self::with_output(size_ms, time.clone(), key.clone(), output.clone());
            Box::new(fresh.expect_in_order(expect_in_order))
        })
    }

    fn fire(&self, start: i64, window: JoinWindow<R>, out: &mut Vec<R>) {
        match &self.output {
            JoinOutput::Semi(output) => {
                for (key, left) in &window.left {
                    if window.right_keys.contains(key) {
                        out.extend(output(left, start));
                    }
                }
            }
            JoinOutput::Pairs { output, dedup } => {
                let mut seen = HashSet::<u64, IdBuildHasher>::default();
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

impl<R: Send + 'static> Operator<R> for WindowJoin<R> {
    fn on_records(&mut self, input: u8, records: Vec<R>, _out: &mut Vec<R>) {
        let semi = matches!(self.output, JoinOutput::Semi(_));
        for record in records {
            let (start, end) = tumbling((self.time)(&record), self.size_ms);
            if complete(end, self.watermark_ms) {
                self.late_records += 1;
                debug_assert!(
                    !self.expect_in_order,
                    "a record behind the watermark {}",
                    self.watermark_ms
                );
                continue;
            }
            let key = (self.key)(&record);
            let window = self.windows.entry(start).or_default();
            match (input, semi) {
                (0, _) => window.left.push((key, record)),
                (_, true) => {
                    window.right_keys.insert(key);
                }
                (_, false) => push_keyed(&mut window.right, key, record),
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<R>) {
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
        while let Some(entry) = self.windows.first_entry() {
            let start = *entry.key();
            if !complete(start + self.size_ms, self.watermark_ms) {
                break;
            }
            let window = entry.remove();
            self.fire(start, window, out);
        }
    }
}

/// Append a record to its key's list; a new list holds exactly one (an empty
/// `Vec`'s first push would reserve four, and most keys of a join hold one record).
fn push_keyed<R>(map: &mut IdMap<u64, Vec<R>>, key: u64, record: R) {
    match map.entry(key) {
        Entry::Occupied(mut list) => list.get_mut().push(record),
        Entry::Vacant(slot) => {
            slot.insert(vec![record]);
        }
    }
}

type UnboundedPairFn<R> = Arc<dyn Fn(&R, &R) -> Option<R> + Send + Sync>;

/// Equi-join of input 0 (left) and input 1 (right) on `key` with no window: every
/// record is kept until the end of input, and each matching pair is output once,
/// through `output(left, right)`, when its second half arrives (in either order).
pub struct UnboundedJoin<R> {
    key: KeyFn<R>,
    output: UnboundedPairFn<R>,
    left_key_unique: bool,
    left: IdMap<u64, Vec<R>>,
    right: IdMap<u64, Vec<R>>,
}

impl<R: Send + 'static> UnboundedJoin<R> {
    pub fn new(
        key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        output: impl Fn(&R, &R) -> Option<R> + Send + Sync + 'static,
    ) -> Self {
        Self::shared(Arc::new(key), Arc::new(output), false)
    }

    fn shared(key: KeyFn<R>, output: UnboundedPairFn<R>, left_key_unique: bool) -> Self {
        UnboundedJoin {
            key,
            output,
            left_key_unique,
            left: IdMap::default(),
            right: IdMap::default(),
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
        let count = |side: &IdMap<u64, Vec<R>>| side.values().map(Vec::len).sum();
        (count(&self.left), count(&self.right))
    }

    pub fn factory(self) -> OperatorFactory<R> {
        let (key, output, unique) = (self.key, self.output, self.left_key_unique);
        Arc::new(move |_| Box::new(Self::shared(key.clone(), output.clone(), unique)))
    }

    fn on_left(&mut self, left: R, out: &mut Vec<R>) {
        let key = (self.key)(&left);
        if self.left_key_unique {
            debug_assert!(
                !self.left.contains_key(&key),
                "a second left record of key {key}"
            );
            for right in self.right.remove(&key).unwrap_or_default() {
                out.extend((self.output)(&left, &right));
            }
        } else if let Some(rights) = self.right.get(&key) {
            out.extend(
                rights
                    .iter()
                    .filter_map(|right| (self.output)(&left, right)),
            );
        }
        push_keyed(&mut self.left, key, left);
    }

    fn on_right(&mut self, right: R, out: &mut Vec<R>) {
        let key = (self.key)(&right);
        let lefts = self.left.get(&key);
        if let Some(lefts) = lefts {
            out.extend(lefts.iter().filter_map(|left| (self.output)(left, &right)));
        }
        if !(self.left_key_unique && lefts.is_some()) {
            push_keyed(&mut self.right, key, right);
        }
    }
}

impl<R: Send + 'static> Operator<R> for UnboundedJoin<R> {
    fn on_records(&mut self, input: u8, records: Vec<R>, out: &mut Vec<R>) {
        for record in records {
            if input == 0 {
                self.on_left(record, out);
            } else {
                self.on_right(record, out);
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, _out: &mut Vec<R>) {
        if watermark_ms == super::END_OF_INPUT {
            self.left = IdMap::default();
            self.right = IdMap::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::END_OF_INPUT;

    /// Test records: inputs `(key, time, value)` and outputs `(key, window, value)`.
    #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum T {
        In {
            key: u64,
            time_ms: i64,
            value: u64,
        },
        Out {
            key: u64,
            window: Window,
            value: u64,
        },
    }

    /// One step of a script: records on an input, or a watermark and the rows it
    /// must fire, as `(key, start, end, value)` in any order.
    enum S {
        Rec(u8, &'static [(u64, i64, u64)]),
        Wm(i64, &'static [(u64, i64, i64, u64)]),
    }
    use S::{Rec, Wm};

    fn time(r: &T) -> i64 {
        match r {
            T::In { time_ms, .. } => *time_ms,
            T::Out { window, .. } => window.0,
        }
    }
    fn key(r: &T) -> u64 {
        match r {
            T::In { key, .. } | T::Out { key, .. } => *key,
        }
    }
    fn value(r: &T) -> u64 {
        match r {
            T::In { value, .. } | T::Out { value, .. } => *value,
        }
    }
    fn out(key: u64, window: Window, value: u64) -> T {
        T::Out { key, window, value }
    }
    fn parse(r: &T) -> Option<(u64, Window, u64)> {
        match r {
            T::Out { key, window, value } => Some((*key, *window, *value)),
            T::In { .. } => None,
        }
    }

    /// Run `script` through `operator`; records must fire nothing, and each
    /// watermark exactly its rows.
    fn check(name: &str, operator: &mut dyn Operator<T>, script: &[S]) {
        for (step, s) in script.iter().enumerate() {
            let mut got = Vec::new();
            let mut expected: Vec<T> = Vec::new();
            match s {
                Rec(input, records) => {
                    let records = records
                        .iter()
                        .map(|&(key, time_ms, value)| T::In {
                            key,
                            time_ms,
                            value,
                        })
                        .collect();
                    operator.on_records(*input, records, &mut got);
                }
                Wm(watermark_ms, rows) => {
                    operator.on_watermark(*watermark_ms, &mut got);
                    expected = rows.iter().map(|&(k, s, e, v)| out(k, (s, e), v)).collect();
                }
            }
            got.sort();
            expected.sort();
            assert_eq!(got, expected, "{name}: step {step}");
        }
    }

    fn count() -> Count<T> {
        Count::two_phase(out, parse)
    }
    /// The largest value per key, every tie kept, as `Out` rows of its tumbling window of 10.
    fn max_value() -> MaxWithTies<T, u64, fn(&T) -> u64> {
        MaxWithTies::two_phase(
            value as fn(&T) -> u64,
            |r| out(key(r), tumbling(time(r), 10), value(r)),
            parse,
        )
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
        let records = |part: &[(u64, i64, u64)]| -> Vec<T> {
            part.iter()
                .map(|&(key, time_ms, value)| T::In {
                    key,
                    time_ms,
                    value,
                })
                .collect()
        };
        let mut merge = WindowMerge::new(max_value());
        let mut partials = Vec::new();
        for part in inputs {
            // One accumulator per window in phase 1 (the q7 shape: key 0), so
            // only each window's overall maximum (9, then 4) survives it.
            let mut phase_1 = WindowAggregate::partial(TUMBLING_10, time, |_| 0, max_value());
            phase_1.on_records(0, records(part), &mut Vec::new());
            phase_1.on_watermark(END_OF_INPUT, &mut partials);
        }
        let mut got = Vec::new();
        merge.on_records(0, partials, &mut got);
        merge.on_watermark(END_OF_INPUT, &mut got);
        got.sort();
        let mut one_phase = WindowAggregate::new(TUMBLING_10, time, |_| 0, max_value());
        let mut expected = Vec::new();
        one_phase.on_records(
            0,
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
        merge.on_records(
            0,
            vec![out(1, (0, 10), 2), out(1, (0, 10), 3), out(2, (0, 10), 1)],
            &mut got,
        );
        merge.on_watermark(10, &mut got);
        got.sort();
        assert_eq!(got, vec![out(1, (0, 10), 5), out(2, (0, 10), 1)]);
    }

    #[test]
    fn late_records_are_counted_not_lost_silently() {
        let mut aggregate =
            WindowAggregate::new(SLIDING_10_5, time, key, count()).expect_in_order(false);
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

        let mut merge = WindowMerge::new(count()).expect_in_order(false);
        merge.on_watermark(10, &mut Vec::new());
        merge.on_records(0, vec![out(1, (0, 10), 2)], &mut Vec::new());
        assert_eq!(merge.late_records(), 1);

        let mut join = WindowJoin::semi(10, time, key, |l, s| Some(out(key(l), (s, s + 10), 0)))
            .expect_in_order(false);
        check(
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
    #[cfg(debug_assertions)]
    #[should_panic(expected = "behind the watermark")]
    fn a_late_record_fails_a_debug_assertion_by_default() {
        let mut aggregate = WindowAggregate::new(TUMBLING_10, time, key, count());
        aggregate.on_watermark(10, &mut Vec::new());
        aggregate.on_records(
            0,
            vec![T::In {
                key: 1,
                time_ms: 3,
                value: 0,
            }],
            &mut Vec::new(),
        );
    }

    /// Pairs as `Out { key, window, value: left * 100 + right }`.
    fn pair(left: &T, right: &T, start: i64) -> Option<T> {
        Some(out(
            key(left),
            (start, start + 10),
            value(left) * 100 + value(right),
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
            let mut join = WindowJoin::new(10, time, key, pair);
            if *dedup {
                // The dedup key is the output's key; the first pair made wins, and
                // within a key left and right records keep their arrival order.
                join = join.dedup(key);
            }
            check(name, &mut join, script);
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
            let mut join = WindowJoin::semi(10, time, key, |left, start| {
                Some(out(key(left), (start, start + 10), value(left)))
            });
            check(name, &mut join, script);
        }
    }

    #[test]
    fn unbounded_join_emits_each_pair_once_in_either_order() {
        let pair =
            |left: &T, right: &T| Some(out(key(left), (0, 0), value(left) * 100 + value(right)));
        type Case = (&'static str, bool, &'static [S]);
        // No windows: every pair comes out as its second half arrives.
        let cases: &[Case] = &[
            (
                "left first",
                false,
                &[
                    Rec(0, &[(1, 0, 1), (2, 0, 2)]),
                    Rec(1, &[(1, 0, 7), (1, 0, 8), (3, 0, 9)]),
                    Wm(END_OF_INPUT, &[]),
                ],
            ),
            (
                "right first",
                false,
                &[
                    Rec(1, &[(1, 0, 7), (1, 0, 8), (3, 0, 9)]),
                    Rec(0, &[(1, 0, 1), (2, 0, 2)]),
                    Wm(END_OF_INPUT, &[]),
                ],
            ),
            (
                "interleaved, left unique",
                true,
                &[
                    Rec(1, &[(1, 0, 7)]),
                    Rec(0, &[(1, 0, 1), (2, 0, 2)]),
                    Rec(1, &[(1, 0, 8), (3, 0, 9)]),
                    Wm(END_OF_INPUT, &[]),
                ],
            ),
        ];
        for (name, unique, script) in cases {
            let mut join = UnboundedJoin::new(key, pair);
            if *unique {
                join = join.left_key_unique();
            }
            let mut got = Vec::new();
            for s in script.iter() {
                match s {
                    Rec(input, records) => {
                        let records = records
                            .iter()
                            .map(|&(key, time_ms, value)| T::In {
                                key,
                                time_ms,
                                value,
                            })
                            .collect();
                        join.on_records(*input, records, &mut got);
                    }
                    Wm(watermark_ms, _) => {
                        if *watermark_ms == END_OF_INPUT {
                            // Both sides held (or, left unique, only unmatched rights).
                            let held = if *unique { (2, 1) } else { (2, 3) };
                            assert_eq!(join.held_records(), held, "{name}");
                        }
                        join.on_watermark(*watermark_ms, &mut got);
                    }
                }
            }
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
}

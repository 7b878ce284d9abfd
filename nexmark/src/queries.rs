//! The Nexmark queries as Dirigo jobs (semantics and columns: NEXMARK.md).
//!
//! Every query runs on one record type, `Row`: input events and the output rows of
//! every query, so that any number of queries can share one dataflow engine.
//! Plans, per query:
//!
//! | query | stages |
//! |---|---|
//! | q0-q2 | source (+ fused filter/map) -> sink |
//! | q3 | source -> persons by id / category-10 auctions by seller -> unbounded join -> sink |
//! | q4 | source -> auctions by id / bids by auction -> closing price at `expires` -> by category: running average -> sink |
//! | q5 | source -> bids by auction -> sliding count per auction, local maxima -> by window: global maxima -> sink |
//! | q7 | source -> bids by auction -> partial max per window -> by window: merged max -> sink |
//! | q8 | source -> persons by id / auctions by seller -> tumbling-window semi-join -> sink |
//!
//! q3, q5, q7 and q8 are built from the library operators of `dataflow::ops`
//! (unbounded join; windowed count with its leading keys; two-phase maximum with
//! ties; window semi-join); q4's closing price (a join that fires at each auction's
//! own `expires`, not at a window's end) stays hand-written here. q5 and q7 are
//! two-phase aggregations: the first keyed stage computes partial results per
//! window that merge associatively, the second, keyed by window, merges the
//! partials of each window when the watermark passes its end.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use dirigo_engine::dataflow::ops::{
    Count, MaxWithTies, TopKeys, UnboundedJoin, WindowJoin, WindowMerge, WindowSpec,
};
use dirigo_engine::dataflow::window::tumbling;
use dirigo_engine::dataflow::{Job, Operator, Sink, Source, SourceBatch};

use crate::{interleaved_chunks, Event, EventReader, Generator, GeneratorConfig, Text};

/// Queries this module builds.
pub const QUERIES: &[&str] = &["q0", "q1", "q2", "q3", "q4", "q5", "q7", "q8"];

const TUMBLE_MS: i64 = 10_000;
const Q5_SIZE_MS: i64 = 10_000;
const Q5_SLIDE_MS: i64 = 2_000;
const EUROS_PER_DOLLAR: f64 = 0.908;
/// Events a generator partition takes at a time (partitions interleave by chunk so
/// that they advance through event time together).
const CHUNK_EVENTS: u64 = 1024;

/// Input events and every query's output rows.
#[derive(Clone, Debug)]
pub enum Row {
    Event(Event),
    Q1 {
        auction: u64,
        bidder: u64,
        price: f64,
        date_time: i64,
    },
    Q2 {
        auction: u64,
        price: u64,
    },
    Q3 {
        name: Text,
        city: Text,
        state: Text,
        id: u64,
    },
    /// q3's projection of an auction: all its join keeps of one.
    Q3Auction {
        id: u64,
        seller: u64,
    },
    Q4Closing {
        category: u64,
        price: u64,
    },
    Q4 {
        category: u64,
        avg: f64,
    },
    Q5 {
        auction: u64,
        num: u64,
        window_start: i64,
        window_end: i64,
    },
    Q7 {
        auction: u64,
        price: u64,
        bidder: u64,
        date_time: i64,
        window_end: i64,
    },
    Q8 {
        id: u64,
        name: Text,
        window_start: i64,
    },
}

impl Row {
    /// The row as a JSON object with NEXMARK.md's column names.
    pub fn to_json(&self) -> Value {
        match self {
            Row::Event(Event::Bid(b)) => json!({
                "auction": b.auction, "bidder": b.bidder, "price": b.price, "channel": b.channel,
                "url": b.url, "date_time": b.date_time, "extra": b.extra,
            }),
            Row::Event(e) => serde_json::to_value(e).unwrap_or(Value::Null),
            Row::Q1 {
                auction,
                bidder,
                price,
                date_time,
            } => {
                json!({"auction": auction, "bidder": bidder, "price": price, "date_time": date_time})
            }
            Row::Q2 { auction, price } => json!({"auction": auction, "price": price}),
            Row::Q3 {
                name,
                city,
                state,
                id,
            } => json!({"name": name, "city": city, "state": state, "id": id}),
            Row::Q3Auction { id, seller } => json!({"id": id, "seller": seller}),
            Row::Q4Closing { category, price } => json!({"category": category, "price": price}),
            Row::Q4 { category, avg } => json!({"category": category, "avg": avg}),
            Row::Q5 {
                auction,
                num,
                window_start,
                window_end,
            } => json!({
                "auction": auction, "num": num, "window_start": window_start, "window_end": window_end,
            }),
            Row::Q7 {
                auction,
                price,
                bidder,
                date_time,
                window_end,
            } => json!({
                "auction": auction, "price": price, "bidder": bidder, "date_time": date_time,
                "window_end": window_end,
            }),
            Row::Q8 {
                id,
                name,
                window_start,
            } => json!({"id": id, "name": name, "window_start": window_start}),
        }
    }

    /// Append the row as one JSON line.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        // Writing JSON into memory cannot fail.
        let _ = serde_json::to_writer(&mut *out, &self.to_json());
        out.push(b'\n');
    }
}

/// Where a query's events come from.
#[derive(Clone)]
pub enum EventSource {
    /// The built-in generator: `events` events, split over the source partitions.
    Generator {
        config: GeneratorConfig,
        events: u64,
    },
    /// JSON Lines from a reader (one partition); `skip_malformed` skips and counts bad lines.
    Reader {
        open: Arc<dyn Fn() -> Box<dyn BufRead + Send> + Send + Sync>,
        skip_malformed: bool,
    },
}

/// How to build a query's job.
#[derive(Clone)]
pub struct QueryOptions {
    pub source: EventSource,
    /// Partitions of the generator source (a reader always has one).
    pub source_parallelism: u32,
    /// Partitions of each keyed stage.
    pub parallelism: u32,
    pub slo: Duration,
    pub rate_events_per_s: Option<u64>,
    pub sink: dirigo_engine::dataflow::graph::SinkFactory<Row>,
    pub sink_parallelism: u32,
}

/// Build the job of `query`, or say why not (an unknown query, a bad option).
pub fn build(query: &str, options: &QueryOptions) -> Result<Job<Row>, String> {
    if !QUERIES.contains(&query) {
        return Err(format!(
            "unknown query {query:?}; the queries are {}",
            QUERIES.join(", ")
        ));
    }
    let mut job = Job::new(query, options.slo);
    job.rate(options.rate_events_per_s);
    let (source_factory, source_parallelism) = source(&options.source, options.source_parallelism)?;
    let events = job.source("nexmark", source_parallelism, source_factory);
    let p = options.parallelism.max(1);
    let sink = options.sink.clone();
    let sinks = options.sink_parallelism.max(1);
    match query {
        "q0" => events.filter(is_bid).sink("sink", sinks, sink),
        "q1" => events.filter(is_bid).map(q1_row).sink("sink", sinks, sink),
        "q2" => events
            .filter(|r| matches!(r, Row::Event(Event::Bid(b)) if b.auction % 123 == 0))
            .map(q2_row)
            .sink("sink", sinks, sink),
        "q3" => {
            // Both sides are projected to what the join keeps: a person's output
            // columns (id: the person's, until joined), an auction's id and seller.
            let persons = events
                .filter(|r| matches!(r, Row::Event(Event::Person(p)) if matches!(&*p.state, "OR" | "ID" | "CA")))
                .map(q3_person)
                .key_by(person_key);
            let auctions = events
                .filter(|r| matches!(r, Row::Event(Event::Auction(a)) if a.category == 10))
                .map(q3_auction)
                .key_by(person_key);
            let join = UnboundedJoin::new(person_key, q3_row).left_key_unique();
            persons
                .join(&auctions, "q3-join", p, join.factory())
                .sink("sink", sinks, sink)
        }
        "q4" => {
            let auctions = events.filter(is_auction).key_by(auction_id);
            let bids = events.filter(is_bid).key_by(bid_auction);
            auctions
                .join(
                    &bids,
                    "q4-closing",
                    p,
                    Arc::new(|_| Box::new(Q4Closing::default())),
                )
                .key_by(|r| match r {
                    Row::Q4Closing { category, .. } => *category,
                    _ => 0,
                })
                .process(
                    "q4-average",
                    p,
                    Arc::new(|_| Box::new(Q4Average::default())),
                )
                .sink("sink", sinks, sink)
        }
        "q5" => {
            // Keyed by auction, so each auction's count is complete in phase 1,
            // which may already keep only its partition's leaders.
            let most_bids = || TopKeys::new(Count::two_phase(q5_row, q5_parse), |n: &u64| *n);
            let windows = WindowSpec::Sliding {
                size_ms: Q5_SIZE_MS,
                slide_ms: Q5_SLIDE_MS,
            };
            events
                .filter(is_bid)
                .key_by(bid_auction)
                .window_aggregate("q5-count", p, windows, event_time, bid_auction, most_bids())
                .key_by(window_key)
                .process("q5-max", p, WindowMerge::new(most_bids()).factory())
                .sink("sink", sinks, sink)
        }
        "q7" => events
            .filter(is_bid)
            .key_by(bid_auction)
            .window_aggregate_two_phase(
                "q7",
                p,
                WindowSpec::Tumbling { size_ms: TUMBLE_MS },
                event_time,
                |_| 0, // one maximum per window
                MaxWithTies::two_phase(bid_price, q7_row, q7_parse),
            )
            .sink("sink", sinks, sink),
        "q8" => {
            // Persons are kept as their output rows; a semi-join: one row per
            // person and window, and of the auctions only the sellers' ids are kept.
            let persons = events.filter(is_person).map(q8_person).key_by(person_key);
            let auctions = events.filter(is_auction).key_by(seller);
            let join = WindowJoin::semi(TUMBLE_MS, event_time, person_key, q8_row);
            persons
                .join(&auctions, "q8-join", p, join.factory())
                .sink("sink", sinks, sink)
        }
        _ => unreachable!("checked against QUERIES"),
    }
    Ok(job)
}

type SourceFactory = dirigo_engine::dataflow::graph::SourceFactory<Row>;

fn source(spec: &EventSource, parallelism: u32) -> Result<(SourceFactory, u32), String> {
    match spec {
        EventSource::Generator { config, events } => {
            let generator = Arc::new(Generator::new(config.clone()).map_err(|e| e.to_string())?);
            let total = *events;
            let factory: SourceFactory = Arc::new(move |part, parts| {
                let chunks =
                    interleaved_chunks(0..total, part as usize, parts as usize, CHUNK_EVENTS);
                Box::new(GeneratorSource {
                    generator: generator.clone(),
                    chunks: Box::new(chunks),
                    current: 0..0,
                })
            });
            Ok((factory, parallelism.max(1)))
        }
        EventSource::Reader {
            open,
            skip_malformed,
        } => {
            let open = open.clone();
            let skip = *skip_malformed;
            let factory: SourceFactory = Arc::new(move |_, _| {
                Box::new(ReaderSource {
                    reader: EventReader::new(open()).skip_malformed(skip),
                    watermark_ms: i64::MIN,
                })
            });
            Ok((factory, 1))
        }
    }
}

struct GeneratorSource {
    generator: Arc<Generator>,
    chunks: Box<dyn Iterator<Item = std::ops::Range<u64>> + Send>,
    current: std::ops::Range<u64>,
}

impl Source<Row> for GeneratorSource {
    fn next_batch(&mut self, max_records: usize, out: &mut Vec<Row>) -> SourceBatch {
        let mut last = None;
        while out.len() < max_records {
            if self.current.is_empty() {
                match self.chunks.next() {
                    Some(chunk) => self.current = chunk,
                    None => break,
                }
            }
            let take = (max_records - out.len()) as u64;
            let end = self.current.end.min(self.current.start + take);
            out.reserve((end - self.current.start) as usize);
            self.generator
                .fill_with(self.current.start..end, |e| out.push(Row::Event(e)));
            last = Some(end - 1);
            self.current.start = end;
        }
        match last {
            Some(n) => SourceBatch::More {
                watermark_ms: self.generator.date_time_ms(n),
            },
            None => SourceBatch::Done,
        }
    }
}

/// JSON Lines events; requires them in `date_time` order (as `dirigo gen` writes them),
/// since its watermark is the latest time read.
struct ReaderSource<R: BufRead> {
    reader: EventReader<R>,
    watermark_ms: i64,
}

impl<R: BufRead + Send + 'static> Source<Row> for ReaderSource<R> {
    fn next_batch(&mut self, max_records: usize, out: &mut Vec<Row>) -> SourceBatch {
        for _ in 0..max_records {
            match self.reader.next() {
                None => return SourceBatch::Done,
                Some(Err(error)) => return SourceBatch::Failed(format!("input {error}")),
                Some(Ok(event)) => {
                    let time_ms = event.date_time();
                    if time_ms < self.watermark_ms {
                        return SourceBatch::Failed(format!(
                            "input line {}: date_time {time_ms} is earlier than {} on an earlier line; \
                             the file source needs events in time order",
                            self.reader.line_number(),
                            self.watermark_ms
                        ));
                    }
                    self.watermark_ms = time_ms;
                    out.push(Row::Event(event));
                }
            }
        }
        SourceBatch::More {
            watermark_ms: self.watermark_ms,
        }
    }

    fn skipped_records(&self) -> u64 {
        self.reader.skipped()
    }
}

fn is_bid(r: &Row) -> bool {
    matches!(r, Row::Event(Event::Bid(_)))
}
fn is_auction(r: &Row) -> bool {
    matches!(r, Row::Event(Event::Auction(_)))
}
fn is_person(r: &Row) -> bool {
    matches!(r, Row::Event(Event::Person(_)))
}
fn person_id(r: &Row) -> u64 {
    match r {
        Row::Event(Event::Person(p)) => p.id,
        _ => 0,
    }
}
fn seller(r: &Row) -> u64 {
    match r {
        Row::Event(Event::Auction(a)) => a.seller,
        _ => 0,
    }
}
fn auction_id(r: &Row) -> u64 {
    match r {
        Row::Event(Event::Auction(a)) => a.id,
        _ => 0,
    }
}
fn bid_auction(r: &Row) -> u64 {
    match r {
        Row::Event(Event::Bid(b)) => b.auction,
        _ => 0,
    }
}
fn window_key(r: &Row) -> u64 {
    match r {
        Row::Q5 { window_start, .. } => *window_start as u64,
        _ => 0,
    }
}
/// Event time; q8's persons, projected, are placed at their window's start.
fn event_time(r: &Row) -> i64 {
    match r {
        Row::Event(e) => e.date_time(),
        Row::Q8 { window_start, .. } => *window_start,
        _ => 0,
    }
}
/// A person's id (also of a person projected for q3 or q8) or an auction's
/// seller: what q3 and q8 join on.
fn person_key(r: &Row) -> u64 {
    match r {
        Row::Event(Event::Auction(a)) => a.seller,
        Row::Q3Auction { seller, .. } => *seller,
        Row::Q3 { id, .. } | Row::Q8 { id, .. } => *id,
        other => person_id(other),
    }
}
fn bid_price(r: &Row) -> u64 {
    match r {
        Row::Event(Event::Bid(b)) => b.price,
        _ => 0,
    }
}
/// What q3 keeps of a person: its output columns, with the person's id for now.
fn q3_person(r: Row) -> Row {
    match r {
        Row::Event(Event::Person(p)) => {
            let p = *p;
            Row::Q3 {
                name: p.name,
                city: p.city,
                state: p.state,
                id: p.id,
            }
        }
        other => other,
    }
}
fn q3_auction(r: Row) -> Row {
    match r {
        Row::Event(Event::Auction(a)) => Row::Q3Auction {
            id: a.id,
            seller: a.seller,
        },
        other => other,
    }
}
fn q3_row(person: &Row, auction: &Row) -> Option<Row> {
    match (person, auction) {
        (
            Row::Q3 {
                name, city, state, ..
            },
            Row::Q3Auction { id, .. },
        ) => Some(Row::Q3 {
            name: name.clone(),
            city: city.clone(),
            state: state.clone(),
            id: *id,
        }),
        _ => None,
    }
}
fn q5_row(auction: u64, (window_start, window_end): (i64, i64), num: u64) -> Row {
    Row::Q5 {
        auction,
        num,
        window_start,
        window_end,
    }
}
fn q5_parse(r: &Row) -> Option<(u64, (i64, i64), u64)> {
    match r {
        Row::Q5 {
            auction,
            num,
            window_start,
            window_end,
        } => Some((*auction, (*window_start, *window_end), *num)),
        _ => None,
    }
}
/// The row q7 keeps of a bid that ties its window's highest price.
fn q7_row(r: &Row) -> Row {
    match r {
        Row::Event(Event::Bid(b)) => Row::Q7 {
            auction: b.auction,
            price: b.price,
            bidder: b.bidder,
            date_time: b.date_time,
            window_end: tumbling(b.date_time, TUMBLE_MS).1,
        },
        other => other.clone(),
    }
}
fn q7_parse(r: &Row) -> Option<(u64, (i64, i64), u64)> {
    match r {
        Row::Q7 {
            price, window_end, ..
        } => Some((0, (window_end - TUMBLE_MS, *window_end), *price)),
        _ => None,
    }
}
/// What q8 keeps of a person: its output row.
fn q8_person(r: Row) -> Row {
    match r {
        Row::Event(Event::Person(p)) => Row::Q8 {
            id: p.id,
            window_start: tumbling(p.date_time, TUMBLE_MS).0,
            name: p.name,
        },
        other => other,
    }
}
fn q8_row(person: &Row, _window_start: i64) -> Option<Row> {
    Some(person.clone())
}
fn q1_row(r: Row) -> Row {
    match r {
        Row::Event(Event::Bid(b)) => Row::Q1 {
            auction: b.auction,
            bidder: b.bidder,
            price: b.price as f64 * EUROS_PER_DOLLAR,
            date_time: b.date_time,
        },
        other => other,
    }
}
fn q2_row(r: Row) -> Row {
    match r {
        Row::Event(Event::Bid(b)) => Row::Q2 {
            auction: b.auction,
            price: b.price,
        },
        other => other,
    }
}

/// q4, first phase: the closing price of each auction, emitted once the watermark
/// passes its `expires`.
struct Q4Closing {
    auctions: HashMap<u64, AuctionState>,
    closing: BTreeMap<i64, Vec<u64>>,
    watermark_ms: i64,
    /// Event time of the next sweep of bids whose auction can no longer come.
    next_sweep_ms: i64,
}

impl Default for Q4Closing {
    fn default() -> Self {
        Q4Closing {
            auctions: HashMap::new(),
            closing: BTreeMap::new(),
            watermark_ms: i64::MIN,
            next_sweep_ms: i64::MIN,
        }
    }
}

/// How often (in event time) `Q4Closing` drops bids whose auction can no longer come.
const Q4_SWEEP_MS: i64 = 1_000;

#[derive(Default)]
struct AuctionState {
    /// `(date_time, expires, category)` once the auction has arrived.
    auction: Option<(i64, i64, u64)>,
    /// Bids that arrived before their auction: `(date_time, price)`.
    early_bids: Vec<(i64, u64)>,
    max_price: Option<u64>,
}

impl AuctionState {
    fn bid(&mut self, date_time: i64, price: u64) {
        match self.auction {
            Some((start, expires, _)) => {
                if start <= date_time && date_time <= expires {
                    self.max_price = Some(self.max_price.map_or(price, |m| m.max(price)));
                }
            }
            None => self.early_bids.push((date_time, price)),
        }
    }
}

impl Operator<Row> for Q4Closing {
    fn on_records(&mut self, _input: u8, records: Vec<Row>, _out: &mut Vec<Row>) {
        for record in records {
            match record {
                Row::Event(Event::Auction(a)) => {
                    let state = self.auctions.entry(a.id).or_default();
                    state.auction = Some((a.date_time, a.expires, a.category));
                    for (date_time, price) in std::mem::take(&mut state.early_bids) {
                        state.bid(date_time, price);
                    }
                    self.closing.entry(a.expires).or_default().push(a.id);
                }
                Row::Event(Event::Bid(b)) => {
                    // Its auction, if valid, is no later than the bid: when the bid is
                    // behind the watermark and the auction is not here, it never comes.
                    if b.date_time < self.watermark_ms && !self.auctions.contains_key(&b.auction) {
                        continue;
                    }
                    self.auctions
                        .entry(b.auction)
                        .or_default()
                        .bid(b.date_time, b.price)
                }
                _ => {}
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Row>) {
        self.watermark_ms = watermark_ms;
        if watermark_ms >= self.next_sweep_ms && watermark_ms != i64::MAX {
            self.next_sweep_ms = watermark_ms.saturating_add(Q4_SWEEP_MS);
            self.auctions.retain(|_, state| {
                state.auction.is_some() || state.early_bids.iter().any(|&(t, _)| t >= watermark_ms)
            });
        }
        // An auction closes when the watermark passes `expires` (bids at `expires` count).
        while let Some(entry) = self.closing.first_entry() {
            if *entry.key() >= watermark_ms && watermark_ms != i64::MAX {
                break;
            }
            for id in entry.remove() {
                let Some(state) = self.auctions.remove(&id) else {
                    continue;
                };
                if let (Some((_, _, category)), Some(price)) = (state.auction, state.max_price) {
                    out.push(Row::Q4Closing { category, price });
                }
            }
        }
        if watermark_ms == i64::MAX {
            self.auctions.clear(); // bids whose auction never came
        }
    }
}

/// q4, second phase: the running average closing price per category.
#[derive(Default)]
struct Q4Average {
    totals: HashMap<u64, (u128, u64)>,
}

impl Operator<Row> for Q4Average {
    fn on_records(&mut self, _input: u8, records: Vec<Row>, out: &mut Vec<Row>) {
        for record in records {
            if let Row::Q4Closing { category, price } = record {
                let (sum, count) = self.totals.entry(category).or_default();
                *sum += price as u128;
                *count += 1;
                out.push(Row::Q4 {
                    category,
                    avg: *sum as f64 / *count as f64,
                });
            }
        }
    }
}

/// A sink that keeps every row, for tests and small runs.
pub struct CollectSink(pub Arc<Mutex<Vec<Row>>>);

impl Sink<Row> for CollectSink {
    fn write(&mut self, records: &[Row]) {
        self.0
            .lock()
            .expect("collect sink poisoned")
            .extend_from_slice(records);
    }
}

/// A sink that only counts (the engine counts outputs for every sink).
pub struct NullSink;

impl Sink<Row> for NullSink {
    fn write(&mut self, _records: &[Row]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Auction, Bid};
    use std::borrow::Cow;

    fn bid(auction: u64, date_time: i64, price: u64) -> Row {
        Row::Event(Event::Bid(Bid {
            auction,
            bidder: 1,
            price,
            channel: Cow::Borrowed(""),
            url: Cow::Borrowed(""),
            date_time,
            extra: Cow::Borrowed(""),
        }))
    }

    fn auction(id: u64, date_time: i64, expires: i64) -> Row {
        Row::Event(Event::Auction(Box::new(Auction {
            id,
            item_name: Cow::Borrowed(""),
            description: Cow::Borrowed(""),
            initial_bid: 1,
            reserve: 1,
            date_time,
            expires,
            seller: 1,
            category: 10,
            extra: Cow::Borrowed(""),
        })))
    }

    #[test]
    fn q4_drops_bids_whose_auction_can_no_longer_come() {
        let mut closing = Q4Closing::default();
        let mut out = Vec::new();
        // A bid ahead of its auction is held; the auction then arrives and closes.
        closing.on_records(1, vec![bid(7, 100, 30)], &mut out);
        closing.on_records(0, vec![auction(7, 90, 500)], &mut out);
        // A bid for an auction that never comes is held only until the watermark
        // passes it; one already behind the watermark is not held at all.
        closing.on_records(1, vec![bid(8, 120, 40)], &mut out);
        assert_eq!(closing.auctions.len(), 2);
        closing.on_watermark(200, &mut out);
        assert_eq!(closing.auctions.len(), 1, "auction 8's bid is swept");
        closing.on_records(1, vec![bid(9, 150, 50)], &mut out);
        assert_eq!(
            closing.auctions.len(),
            1,
            "a bid behind the watermark is not held"
        );
        closing.on_watermark(501, &mut out);
        assert!(matches!(
            out.as_slice(),
            [Row::Q4Closing {
                category: 10,
                price: 30
            }]
        ));
        assert!(closing.auctions.is_empty());
    }
}

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
//! | q8 | source -> persons by id / auctions by seller -> tumbling-window join -> sink |
//!
//! q5 and q7 are two-phase aggregations: the first keyed stage computes partial
//! results per window that merge associatively (a maximum with its ties), the
//! second merges the partials of each window when the watermark passes its end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::dataflow::window::{sliding, tumbling};
use crate::dataflow::{Job, Operator, Sink, Source, SourceBatch};

use super::{interleaved_chunks, Event, EventReader, Generator, GeneratorConfig, Text};

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
    pub sink: crate::dataflow::graph::SinkFactory<Row>,
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
            let persons = events
                .filter(|r| matches!(r, Row::Event(Event::Person(p)) if matches!(&*p.state, "OR" | "ID" | "CA")))
                .key_by(person_id);
            let auctions = events
                .filter(|r| matches!(r, Row::Event(Event::Auction(a)) if a.category == 10))
                .key_by(seller);
            persons
                .join(
                    &auctions,
                    "q3-join",
                    p,
                    Arc::new(|_| Box::new(Q3Join::default())),
                )
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
        "q5" => events
            .filter(is_bid)
            .key_by(bid_auction)
            .process("q5-count", p, Arc::new(|_| Box::new(Q5Count::default())))
            .key_by(window_key)
            .process("q5-max", p, Arc::new(|_| Box::new(Q5Max::default())))
            .sink("sink", sinks, sink),
        "q7" => events
            .filter(is_bid)
            .key_by(bid_auction)
            .process("q7-partial", p, Arc::new(|_| Box::new(Q7Max::partial())))
            .key_by(window_key)
            .process("q7-merge", p, Arc::new(|_| Box::new(Q7Max::merge())))
            .sink("sink", sinks, sink),
        "q8" => {
            let persons = events.filter(is_person).key_by(person_id);
            let auctions = events.filter(is_auction).key_by(seller);
            persons
                .join(
                    &auctions,
                    "q8-join",
                    p,
                    Arc::new(|_| Box::new(Q8Join::default())),
                )
                .sink("sink", sinks, sink)
        }
        _ => unreachable!("checked against QUERIES"),
    }
    Ok(job)
}

type SourceFactory = crate::dataflow::graph::SourceFactory<Row>;

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
        Row::Q7 { window_end, .. } => *window_end as u64,
        _ => 0,
    }
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

/// q3: persons (input 0) joined with category-10 auctions (input 1) on seller.
#[derive(Default)]
struct Q3Join {
    persons: HashMap<u64, (Text, Text, Text)>,
    waiting: HashMap<u64, Vec<u64>>,
}

impl Operator<Row> for Q3Join {
    fn on_records(&mut self, _input: u8, records: Vec<Row>, out: &mut Vec<Row>) {
        for record in records {
            match record {
                Row::Event(Event::Person(p)) => {
                    for id in self.waiting.remove(&p.id).unwrap_or_default() {
                        out.push(Row::Q3 {
                            name: p.name.clone(),
                            city: p.city.clone(),
                            state: p.state.clone(),
                            id,
                        });
                    }
                    self.persons.insert(p.id, (p.name, p.city, p.state));
                }
                Row::Event(Event::Auction(a)) => match self.persons.get(&a.seller) {
                    Some((name, city, state)) => out.push(Row::Q3 {
                        name: name.clone(),
                        city: city.clone(),
                        state: state.clone(),
                        id: a.id,
                    }),
                    None => self.waiting.entry(a.seller).or_default().push(a.id),
                },
                _ => {}
            }
        }
    }
}

/// q4, first phase: the closing price of each auction, emitted once the watermark
/// passes its `expires`.
#[derive(Default)]
struct Q4Closing {
    auctions: HashMap<u64, AuctionState>,
    closing: BTreeMap<i64, Vec<u64>>,
}

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
                Row::Event(Event::Bid(b)) => self
                    .auctions
                    .entry(b.auction)
                    .or_default()
                    .bid(b.date_time, b.price),
                _ => {}
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Row>) {
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

/// q5, first phase: bids per auction per sliding window; at each window's end, the
/// auctions with this partition's highest count (every auction's count is complete
/// here, so the global winners are among the local ones).
#[derive(Default)]
struct Q5Count {
    windows: BTreeMap<(i64, i64), HashMap<u64, u64>>,
}

impl Operator<Row> for Q5Count {
    fn on_records(&mut self, _input: u8, records: Vec<Row>, _out: &mut Vec<Row>) {
        for record in records {
            if let Row::Event(Event::Bid(b)) = record {
                for window in sliding(b.date_time, Q5_SIZE_MS, Q5_SLIDE_MS) {
                    *self
                        .windows
                        .entry((window.1, window.0))
                        .or_default()
                        .entry(b.auction)
                        .or_default() += 1;
                }
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Row>) {
        while let Some(entry) = self.windows.first_entry() {
            let (window_end, window_start) = *entry.key();
            if window_end > watermark_ms {
                break;
            }
            let counts = entry.remove();
            let max = counts.values().copied().max().unwrap_or(0);
            for (auction, num) in counts {
                if num == max {
                    out.push(Row::Q5 {
                        auction,
                        num,
                        window_start,
                        window_end,
                    });
                }
            }
        }
    }
}

/// q5, second phase: per window, the auctions with the highest count overall.
#[derive(Default)]
struct Q5Max {
    windows: BTreeMap<i64, (u64, Vec<Row>)>,
}

impl Operator<Row> for Q5Max {
    fn on_records(&mut self, _input: u8, records: Vec<Row>, _out: &mut Vec<Row>) {
        for record in records {
            if let Row::Q5 {
                num, window_end, ..
            } = record
            {
                keep_max(self.windows.entry(window_end).or_default(), num, record);
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Row>) {
        fire(&mut self.windows, watermark_ms, out);
    }
}

/// Keep `row` if `value` ties or beats the best so far.
fn keep_max(best: &mut (u64, Vec<Row>), value: u64, row: Row) {
    if best.1.is_empty() || value > best.0 {
        *best = (value, vec![row]);
    } else if value == best.0 {
        best.1.push(row);
    }
}

/// Emit and drop every window whose end the watermark has reached.
fn fire(windows: &mut BTreeMap<i64, (u64, Vec<Row>)>, watermark_ms: i64, out: &mut Vec<Row>) {
    while let Some(entry) = windows.first_entry() {
        if *entry.key() > watermark_ms {
            break;
        }
        out.extend(entry.remove().1);
    }
}

/// q7: the highest bids per tumbling window, as a mergeable maximum with ties:
/// `partial` folds bids, `merge` folds the partials of every first-phase partition.
struct Q7Max {
    from_bids: bool,
    windows: BTreeMap<i64, (u64, Vec<Row>)>,
}

impl Q7Max {
    fn partial() -> Self {
        Q7Max {
            from_bids: true,
            windows: BTreeMap::new(),
        }
    }
    fn merge() -> Self {
        Q7Max {
            from_bids: false,
            windows: BTreeMap::new(),
        }
    }
}

impl Operator<Row> for Q7Max {
    fn on_records(&mut self, _input: u8, records: Vec<Row>, _out: &mut Vec<Row>) {
        for record in records {
            let row = match record {
                Row::Event(Event::Bid(b)) if self.from_bids => Row::Q7 {
                    auction: b.auction,
                    price: b.price,
                    bidder: b.bidder,
                    date_time: b.date_time,
                    window_end: tumbling(b.date_time, TUMBLE_MS).1,
                },
                row @ Row::Q7 { .. } if !self.from_bids => row,
                _ => continue,
            };
            if let Row::Q7 {
                price, window_end, ..
            } = row
            {
                keep_max(self.windows.entry(window_end).or_default(), price, row);
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Row>) {
        fire(&mut self.windows, watermark_ms, out);
    }
}

/// q8: persons (input 0) who opened an auction (input 1) in the tumbling window
/// they registered in.
#[derive(Default)]
struct Q8Join {
    windows: BTreeMap<i64, (HashMap<u64, Text>, HashSet<u64>)>,
}

impl Operator<Row> for Q8Join {
    fn on_records(&mut self, _input: u8, records: Vec<Row>, _out: &mut Vec<Row>) {
        for record in records {
            match record {
                Row::Event(Event::Person(p)) => {
                    let (start, _) = tumbling(p.date_time, TUMBLE_MS);
                    self.windows
                        .entry(start)
                        .or_default()
                        .0
                        .insert(p.id, p.name);
                }
                Row::Event(Event::Auction(a)) => {
                    let (start, _) = tumbling(a.date_time, TUMBLE_MS);
                    self.windows.entry(start).or_default().1.insert(a.seller);
                }
                _ => {}
            }
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Row>) {
        while let Some(entry) = self.windows.first_entry() {
            let window_start = *entry.key();
            if window_start + TUMBLE_MS > watermark_ms {
                break;
            }
            let (persons, sellers) = entry.remove();
            for (id, name) in persons {
                if sellers.contains(&id) {
                    out.push(Row::Q8 {
                        id,
                        name,
                        window_start,
                    });
                }
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

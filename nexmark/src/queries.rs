//! The Nexmark queries as Dirigo jobs (semantics and columns: NEXMARK.md), written
//! on the typed dataflow API: every edge carries its own record type, and each
//! query reads like its SQL.
//!
//! | query | plan |
//! |---|---|
//! | q0-q2 | `Stream<Event>` -> bids (+ fused filter/map) -> sink |
//! | q3 | persons in OR/ID/CA by id, category-10 auctions by seller -> unbounded join -> sink |
//! | q4 | auctions by id, bids by auction -> closing price at `expires` -> by category: running average -> sink |
//! | q5 | bids by auction -> sliding count per auction, each partition's leaders -> by window: global leaders -> sink |
//! | q7 | bids by auction -> partial max per window -> by window: merged max -> sink |
//! | q8 | persons by id, auctions by seller -> tumbling-window semi-join -> sink |
//!
//! q3, q5, q7 and q8 are built from the library operators of `dataflow::ops`
//! (unbounded join; windowed count with its leading keys; two-phase maximum with
//! ties; window semi-join); q4's closing price (a join that fires at each auction's
//! own `expires`, not at a window's end) is written here. Inputs are projected to
//! what each query keeps before they are partitioned (a fused step, no stage):
//! q5 moves `(auction, date_time)` pairs, not whole bids.
//!
//! Output rows are plain structs whose field names are NEXMARK.md's columns; a
//! query ends in a sink of its own row type, chosen by [`Output`] (count only, or
//! JSON Lines to a writer).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use dirigo_engine::dataflow::checkpoint::{Sealed, StagedOutput};
use dirigo_engine::dataflow::graph::SinkFactory;
use dirigo_engine::dataflow::ops::{
    Count, MaxWithTies, Side, TopKeys, UnboundedJoin, WindowJoin, WindowMerge, WindowPartial,
    WindowSpec,
};
use dirigo_engine::dataflow::state::{GroupState, KeyGroups, KeyedState, Stateful};
use dirigo_engine::dataflow::window::tumbling;
use dirigo_engine::dataflow::{
    Data, Job, JoinOperator, Operator, RateSchedule, Sink, Source, SourceBatch,
};
use dirigo_engine::ids::IdMap;

use crate::{interleaved_chunks, Auction, Bid, Event, Generator, GeneratorConfig};
use crate::{Person, Text};

/// Queries this module builds.
pub const QUERIES: &[&str] = &["q0", "q1", "q2", "q3", "q4", "q5", "q7", "q8"];

const TUMBLE_MS: i64 = 10_000;
const Q5_SIZE_MS: i64 = 10_000;
const Q5_SLIDE_MS: i64 = 2_000;
const EUROS_PER_DOLLAR: f64 = 0.908;
/// Events a generator partition takes at a time (partitions interleave by chunk so
/// that they advance through event time together).
const CHUNK_EVENTS: u64 = 1024;

/// q1: a bid's price in euros.
#[derive(Clone, Debug, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q1 {
    pub auction: u64,
    pub bidder: u64,
    pub price: f64,
    pub date_time: i64,
}

/// q2: bids of every 123rd auction.
#[derive(Clone, Debug, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q2 {
    pub auction: u64,
    pub price: u64,
}

/// q3: a seller in OR, ID or CA and one of their category-10 auctions. Before
/// the join it is the person's projection, with the person's `id`.
#[derive(Clone, Debug, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q3 {
    #[rkyv(with = rkyv::with::AsOwned)]
    pub name: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub city: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub state: Text,
    pub id: u64,
}

/// q3's projection of an auction: all its join keeps of one.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q3Auction {
    pub id: u64,
    pub seller: u64,
}

/// q4's projection of an auction.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q4Auction {
    pub id: u64,
    pub date_time: i64,
    pub expires: i64,
    pub category: u64,
}

/// q4's projection of a bid.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q4Bid {
    pub auction: u64,
    pub date_time: i64,
    pub price: u64,
}

/// q4, between its phases: one closed auction's price.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q4Closing {
    pub category: u64,
    pub price: u64,
}

/// q4: the running average closing price of a category.
#[derive(Clone, Debug, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q4 {
    pub category: u64,
    pub avg: f64,
}

/// q5's projection of a bid.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AuctionTime {
    pub auction: u64,
    pub date_time: i64,
}

/// q5: an auction with the most bids in a sliding window.
#[derive(Clone, Debug, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q5 {
    pub auction: u64,
    pub num: u64,
    pub window_start: i64,
    pub window_end: i64,
}

/// q7: a bid with the highest price of its tumbling window.
#[derive(Clone, Debug, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q7 {
    pub auction: u64,
    pub price: u64,
    pub bidder: u64,
    pub date_time: i64,
    pub window_end: i64,
}

/// q8: a person who registered and opened an auction in the same window.
#[derive(Clone, Debug, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q8 {
    pub id: u64,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub name: Text,
    pub window_start: i64,
}

/// q8's projection of an auction.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SellerTime {
    pub seller: u64,
    pub date_time: i64,
}

/// Where a query's events come from.
#[derive(Clone)]
pub enum EventSource {
    /// The built-in generator: `events` events, split over the source partitions.
    Generator {
        config: GeneratorConfig,
        events: u64,
    },
    /// A JSON Lines file (as `dirigo gen` writes it) split into one byte range
    /// per source partition, read in parallel (see `file`).
    File {
        path: std::path::PathBuf,
        options: crate::FileOptions,
    },
}

/// Receives a sink partition's rows as JSON Lines.
pub trait LineWriter: Send + 'static {
    /// `lines` holds whole lines, each a JSON object and a newline.
    fn write_lines(&mut self, lines: &[u8]);
    /// The end of input reached the sink partition.
    fn finish(&mut self) {}
    /// A checkpoint barrier reached the sink partition: the lines written
    /// since the last one, staged for exactly-once output (see
    /// `Sink::seal`); none for a writer that writes straight through.
    fn seal(&mut self) -> Result<Vec<Sealed>, String> {
        Ok(Vec::new())
    }
}

/// Lines staged in a data directory, appended to their output file only when
/// their checkpoint commits (`dirigo run --data-dir`).
pub struct StagedLines(pub StagedOutput);

impl LineWriter for StagedLines {
    fn write_lines(&mut self, lines: &[u8]) {
        self.0.write(lines);
    }
    fn seal(&mut self) -> Result<Vec<Sealed>, String> {
        Ok(self.0.seal())
    }
}

/// Makes the line writer of each sink partition.
pub type LineWriterFactory = Arc<dyn Fn(u32) -> Box<dyn LineWriter> + Send + Sync>;

/// Where a query's rows go.
#[derive(Clone)]
pub enum Output {
    /// Nowhere: the engine counts every sink's rows.
    Null,
    /// As JSON Lines with NEXMARK.md's column names.
    JsonLines(LineWriterFactory),
}

/// How to build a query's job.
#[derive(Clone)]
pub struct QueryOptions {
    pub source: EventSource,
    /// Partitions of the source: the generator's, or a file's (each reads
    /// its own split of the file).
    pub source_parallelism: u32,
    /// Partitions of each keyed stage.
    pub parallelism: u32,
    pub slo: Duration,
    /// Pace the source by this schedule of rates (events/s over all partitions);
    /// `None`: as fast as it goes.
    pub pace: Option<RateSchedule>,
    pub output: Output,
    pub sink_parallelism: u32,
}

/// Whether `query` is one this module builds; if not, an error that lists them.
pub fn check(query: &str) -> Result<(), String> {
    match QUERIES.contains(&query) {
        true => Ok(()),
        false => Err(format!(
            "unknown query {query:?}; the queries are {}",
            QUERIES.join(", ")
        )),
    }
}

/// Build the job of `query`, or say why not (an unknown query, a bad option).
pub fn build(query: &str, options: &QueryOptions) -> Result<Job, String> {
    check(query)?;
    let mut job = Job::new(query, options.slo);
    job.pace(options.pace.clone());
    let (source_factory, source_parallelism) = source(&options.source, options.source_parallelism)?;
    let events = job.source("nexmark", source_parallelism, source_factory);
    let p = options.parallelism.max(1);
    let sinks = options.sink_parallelism.max(1);
    let output = &options.output;
    let bids = events.filter_map(bid);
    // Persons and auctions are a few percent of the events: taken by reference,
    // a branch lent the source's batch (q3 and q8 read both) copies only them.
    let persons = events.filter_map_ref(person);
    let auctions = events.filter_map_ref(auction);
    match query {
        // SELECT * FROM bid
        "q0" => bids.sink("sink", sinks, sink(output)),
        // SELECT auction, bidder, 0.908 * price AS price, date_time FROM bid
        // One step from events to rows (a bid, then its row, in one pass).
        "q1" => events
            .filter_map(|e| {
                bid(e).map(|b| Q1 {
                    auction: b.auction,
                    bidder: b.bidder,
                    price: b.price as f64 * EUROS_PER_DOLLAR,
                    date_time: b.date_time,
                })
            })
            .sink("sink", sinks, sink(output)),
        // SELECT auction, price FROM bid WHERE auction % 123 = 0
        "q2" => bids
            .filter(|b| b.auction % 123 == 0)
            .map(|b| Q2 {
                auction: b.auction,
                price: b.price,
            })
            .sink("sink", sinks, sink(output)),
        // SELECT p.name, p.city, p.state, a.id FROM auction a JOIN person p ON a.seller = p.id
        // WHERE a.category = 10 AND p.state IN ('OR', 'ID', 'CA')
        "q3" => {
            let sellers = persons
                .filter(|p| matches!(&*p.state, "OR" | "ID" | "CA"))
                .map(|p| Q3 {
                    name: p.name,
                    city: p.city,
                    state: p.state,
                    id: p.id,
                })
                .key_by(|p| p.id);
            let items = auctions
                .filter(|a| a.category == 10)
                .map(|a| Q3Auction {
                    id: a.id,
                    seller: a.seller,
                })
                .key_by(|a| a.seller);
            let join = UnboundedJoin::new(
                |p: &Q3| p.id,
                |a: &Q3Auction| a.seller,
                |p, a| {
                    Some(Q3 {
                        id: a.id,
                        ..p.clone()
                    })
                },
            );
            sellers
                .join(&items, "q3-join", p, join.left_key_unique().factory())
                .sink("sink", sinks, sink(output))
        }
        // SELECT category, AVG(final) FROM (SELECT MAX(b.price) AS final, a.category
        //   FROM auction a JOIN bid b ON a.id = b.auction
        //   WHERE b.date_time BETWEEN a.date_time AND a.expires GROUP BY a.id, a.category)
        // GROUP BY category
        "q4" => {
            let opened = auctions
                .map(|a| Q4Auction {
                    id: a.id,
                    date_time: a.date_time,
                    expires: a.expires,
                    category: a.category,
                })
                .key_by(|a| a.id);
            let offers = bids
                .map(|b| Q4Bid {
                    auction: b.auction,
                    date_time: b.date_time,
                    price: b.price,
                })
                .key_by(|b| b.auction);
            opened
                .join(
                    &offers,
                    "q4-closing",
                    p,
                    Arc::new(|_| Box::new(ClosingPrices::default())),
                )
                .key_by(|c: &Q4Closing| c.category)
                .process(
                    "q4-average",
                    p,
                    Arc::new(|_| Box::new(Q4Average::default())),
                )
                .sink("sink", sinks, sink(output))
        }
        // SELECT auction, num, window_start, window_end FROM (SELECT auction, COUNT(*) AS num
        //   FROM HOP(bid, 2 s, 10 s) GROUP BY auction, window) WHERE num = MAX(num) OVER window
        "q5" => {
            // Keyed by auction, so each auction's count is complete in phase 1,
            // which keeps only its partition's leaders of each window.
            let most_bids = || {
                let count = Count::new(|auction, (window_start, window_end), num| Q5 {
                    auction,
                    num,
                    window_start,
                    window_end,
                });
                TopKeys::new(count, |n: &u64| *n)
            };
            let windows = WindowSpec::Sliding {
                size_ms: Q5_SIZE_MS,
                slide_ms: Q5_SLIDE_MS,
            };
            let leaders = WindowPartial::new(
                windows,
                |b: &AuctionTime| b.date_time,
                |b: &AuctionTime| b.auction,
                most_bids(),
            );
            bids.map(|b| AuctionTime {
                auction: b.auction,
                date_time: b.date_time,
            })
            .key_by(|b| b.auction)
            .process("q5-count", p, leaders.keys_complete().factory())
            .key_by(|partial| partial.window.1 as u64)
            .process("q5-max", p, WindowMerge::new(most_bids()).factory())
            .sink("sink", sinks, sink(output))
        }
        // SELECT auction, price, bidder, date_time, window_end FROM bid
        // WHERE price = MAX(price) OVER TUMBLE(10 s)
        "q7" => bids
            .map(|b| Q7 {
                auction: b.auction,
                price: b.price,
                bidder: b.bidder,
                date_time: b.date_time,
                // A time whose window does not fit in i64 is counted late below.
                window_end: tumbling(b.date_time, TUMBLE_MS).map_or(i64::MAX, |w| w.1),
            })
            .key_by(|b| b.auction)
            .window_aggregate_two_phase(
                "q7",
                p,
                WindowSpec::Tumbling { size_ms: TUMBLE_MS },
                |b| b.date_time,
                |_| 0, // one maximum per window
                MaxWithTies::new(|b: &Q7| b.price, Q7::clone),
            )
            .sink("sink", sinks, sink(output)),
        // SELECT p.id, p.name, p.window_start FROM TUMBLE(person, 10 s) p
        // JOIN TUMBLE(auction, 10 s) a ON p.id = a.seller AND p.window = a.window
        "q8" => {
            // A semi-join: one row per person and window; of the auctions only
            // the sellers are kept.
            let new_users = persons
                .map(|p| Q8 {
                    id: p.id,
                    window_start: tumbling(p.date_time, TUMBLE_MS).map_or(i64::MAX, |w| w.0),
                    name: p.name,
                })
                .key_by(|p| p.id);
            let sellers = auctions
                .map(|a| SellerTime {
                    seller: a.seller,
                    date_time: a.date_time,
                })
                .key_by(|a| a.seller);
            let join = WindowJoin::semi(
                TUMBLE_MS,
                Side::new(|p: &Q8| p.window_start, |p: &Q8| p.id),
                Side::new(|a: &SellerTime| a.date_time, |a: &SellerTime| a.seller),
                |p: &Q8, _window_start| Some(p.clone()),
            );
            new_users
                .join(&sellers, "q8-join", p, join.factory())
                .sink("sink", sinks, sink(output))
        }
        _ => unreachable!("checked against QUERIES"),
    }
    Ok(job)
}

fn bid(e: Event) -> Option<Bid> {
    match e {
        Event::Bid(b) => Some(b),
        _ => None,
    }
}

fn person(e: &Event) -> Option<Person> {
    match e {
        Event::Person(p) => Some(Person::clone(p)),
        _ => None,
    }
}

fn auction(e: &Event) -> Option<Auction> {
    match e {
        Event::Auction(a) => Some(Auction::clone(a)),
        _ => None,
    }
}

/// The sink of a query's row type for `output`.
fn sink<T: Data + Serialize>(output: &Output) -> SinkFactory<T> {
    match output {
        Output::Null => Arc::new(|_| Box::new(NullSink)),
        Output::JsonLines(writers) => {
            let writers = writers.clone();
            Arc::new(move |partition| {
                Box::new(JsonSink {
                    writer: writers(partition),
                    lines: Vec::new(),
                })
            })
        }
    }
}

type SourceFactory = dirigo_engine::dataflow::SourceFactory<Event>;

fn source(spec: &EventSource, parallelism: u32) -> Result<(SourceFactory, u32), String> {
    match spec {
        EventSource::Generator { config, events } => {
            let generator = Arc::new(Generator::new(config.clone()).map_err(|e| e.to_string())?);
            let total = *events;
            let factory: SourceFactory = Arc::new(move |part, parts| {
                Box::new(GeneratorSource::new(generator.clone(), total, part, parts))
            });
            Ok((factory, parallelism.max(1)))
        }
        EventSource::File { path, options } => {
            let parts = parallelism.max(1);
            let split = crate::FileSplit::plan(path, parts, *options)?;
            let factory: SourceFactory = Arc::new(move |part, _| Box::new(split.open(part)));
            Ok((factory, parts))
        }
    }
}

/// One partition of the generator: the chunks [`interleaved_chunks`] gives it
/// of `0..total`, in order. An event is computed from `(seed, n)` alone, so the
/// partition replays by event number: its position is the next event number to
/// produce, and `seek` rebuilds the chunk walk from the chunk that holds it.
struct GeneratorSource {
    generator: Arc<Generator>,
    total: u64,
    part: u32,
    parts: u32,
    /// What is left of the chunk being produced. Empty only at the end of the
    /// walk (then `total..total`): the next chunk is taken as soon as one is used
    /// up, so `current.start` is always the next event number to produce.
    current: std::ops::Range<u64>,
    /// The chunks after `current`.
    chunks: Box<dyn Iterator<Item = std::ops::Range<u64>> + Send>,
}

/// `GENERATOR_POSITION_VERSION`, then little-endian: the next event number
/// (u64; `total` at the end), `total` (u64), the partition (u32) and the
/// partitions (u32). The last three only check that the position fits.
const GENERATOR_POSITION_VERSION: u8 = 1;
const GENERATOR_POSITION_BYTES: usize = 1 + 8 + 8 + 4 + 4;

impl GeneratorSource {
    fn new(generator: Arc<Generator>, total: u64, part: u32, parts: u32) -> GeneratorSource {
        let mut chunks = interleaved_chunks(0..total, part as usize, parts as usize, CHUNK_EVENTS);
        GeneratorSource {
            generator,
            total,
            part,
            parts,
            current: chunks.next().unwrap_or(total..total),
            chunks: Box::new(chunks),
        }
    }
}

impl Source<Event> for GeneratorSource {
    fn next_batch(&mut self, max_records: usize, out: &mut Vec<Event>) -> SourceBatch {
        let mut last = None;
        while out.len() < max_records && !self.current.is_empty() {
            let take = (max_records - out.len()) as u64;
            let end = self
                .current
                .end
                .min(self.current.start.saturating_add(take));
            out.reserve((end - self.current.start) as usize);
            self.generator
                .fill_with(self.current.start..end, |e| out.push(e));
            last = Some(end - 1);
            self.current.start = end;
            if self.current.is_empty() {
                self.current = self.chunks.next().unwrap_or(self.total..self.total);
            }
        }
        match last {
            Some(n) => SourceBatch::More {
                watermark_ms: self.generator.date_time_ms(n),
            },
            None => SourceBatch::Done,
        }
    }

    fn position(&self) -> Option<Vec<u8>> {
        let mut bytes = Vec::with_capacity(GENERATOR_POSITION_BYTES);
        bytes.push(GENERATOR_POSITION_VERSION);
        bytes.extend_from_slice(&self.current.start.to_le_bytes());
        bytes.extend_from_slice(&self.total.to_le_bytes());
        bytes.extend_from_slice(&self.part.to_le_bytes());
        bytes.extend_from_slice(&self.parts.to_le_bytes());
        Some(bytes)
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), String> {
        if position.len() != GENERATOR_POSITION_BYTES {
            return Err(format!(
                "generator position: {} bytes, expected {GENERATOR_POSITION_BYTES} bytes",
                position.len()
            ));
        }
        if position[0] != GENERATOR_POSITION_VERSION {
            return Err(format!(
                "generator position: version {}, expected version {GENERATOR_POSITION_VERSION}",
                position[0]
            ));
        }
        let u64_at = |at: usize| u64::from_le_bytes(position[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(position[at..at + 4].try_into().unwrap());
        let (next, total, part, parts) = (u64_at(1), u64_at(9), u32_at(17), u32_at(21));
        if (total, part, parts) != (self.total, self.part, self.parts) {
            return Err(format!(
                "generator position: saved by partition {part} of {parts} over {total} events, \
                 but this is partition {} of {} over {} events",
                self.part, self.parts, self.total
            ));
        }
        // Chunk `i` of `0..total` is partition `i % parts`'s.
        let chunk = next / CHUNK_EVENTS;
        if next > total || (next < total && chunk % parts.max(1) as u64 != part as u64) {
            return Err(format!(
                "generator position: event {next} is not one partition {part} of {parts} \
                 produces (of {total} events in chunks of {CHUNK_EVENTS})"
            ));
        }
        if next == total {
            self.current = total..total;
            self.chunks = Box::new(std::iter::empty());
            return Ok(());
        }
        // The walk from the chunk holding `next` on: the same chunks, since
        // chunk boundaries are multiples of CHUNK_EVENTS from 0.
        let mut chunks =
            interleaved_chunks(chunk * CHUNK_EVENTS..total, 0, parts as usize, CHUNK_EVENTS);
        let first = chunks.next().expect("next < total is in a chunk");
        self.current = next..first.end;
        self.chunks = Box::new(chunks);
        Ok(())
    }
}

/// Replay of the generator source (kept next to it, apart from the module's
/// other tests).
#[cfg(test)]
mod generator_replay_tests {
    use super::*;

    fn factory(total: u64, parts: u32) -> SourceFactory {
        let spec = EventSource::Generator {
            config: GeneratorConfig {
                seed: 7,
                ..GeneratorConfig::default()
            },
            events: total,
        };
        source(&spec, parts).unwrap().0
    }

    /// One `next_batch` into `out`: false once the source says `Done`. A batch's
    /// watermark is its last event's time.
    fn step(source: &mut dyn Source<Event>, max_records: usize, out: &mut Vec<Event>) -> bool {
        let before = out.len();
        let mut batch = Vec::new();
        let answer = source.next_batch(max_records, &mut batch);
        out.extend(batch);
        match answer {
            SourceBatch::More { watermark_ms } => {
                assert!(out.len() > before && out.len() - before <= max_records);
                assert_eq!(watermark_ms, out.last().unwrap().date_time());
                true
            }
            SourceBatch::Done => {
                assert_eq!(out.len(), before, "the last events come with More");
                false
            }
            SourceBatch::Pending | SourceBatch::Failed(_) => {
                panic!("a generator never waits or fails")
            }
        }
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// For cuts before the first batch, after every batch, after the end and at
    /// random: the events up to the cut, then those of a fresh source sought to
    /// the cut's position, are exactly the uninterrupted partition's.
    #[test]
    fn generator_source_resumes_exactly_at_every_cut() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let totals = [0, 1, 1023, 1024, 1025, 3 * 1024 + 7, 6000];
        for total in totals {
            for parts in 1..=4 {
                let factory = factory(total, parts);
                for part in 0..parts {
                    let max_records =
                        [1024, 512, 300 + rng.below(700) as usize][rng.below(3) as usize];
                    let mut whole = Vec::new();
                    let mut whole_source = factory(part, parts);
                    let mut batches = 0;
                    while step(&mut *whole_source, max_records, &mut whole) {
                        batches += 1;
                    }
                    let want: Vec<u64> =
                        interleaved_chunks(0..total, part as usize, parts as usize, CHUNK_EVENTS)
                            .flatten()
                            .collect();
                    let generator = Generator::new(GeneratorConfig {
                        seed: 7,
                        ..GeneratorConfig::default()
                    })
                    .unwrap();
                    assert!(whole
                        .iter()
                        .cloned()
                        .eq(want.iter().map(|&n| generator.event(n))));
                    let random = (0..3).map(|_| rng.below(batches + 2));
                    for cut in (0..=batches + 1).chain(random) {
                        let context = format!("{total} events, part {part} of {parts}, {max_records} a batch, cut after {cut} calls");
                        let mut first = factory(part, parts);
                        let mut events = Vec::new();
                        for _ in 0..cut {
                            step(&mut *first, max_records, &mut events);
                        }
                        let position = first.position().expect("a position");
                        let mut second = factory(part, parts);
                        second
                            .seek(&position)
                            .unwrap_or_else(|e| panic!("{context}: {e}"));
                        assert_eq!(second.position(), Some(position), "{context}");
                        while step(&mut *second, max_records, &mut events) {}
                        assert!(events == whole, "{context}");
                    }
                }
            }
        }
    }

    /// A position that does not decode or is not this partition's is an error
    /// that says why, never a panic.
    #[test]
    fn generator_source_refuses_positions_that_do_not_fit() {
        let factory = factory(5000, 3);
        let mut source = factory(1, 3);
        let mut out = Vec::new();
        step(&mut *source, 100, &mut out);
        let position = source.position().unwrap();
        assert_eq!(position.len(), GENERATOR_POSITION_BYTES);
        // The next event number is 1024 + 100: partition 1 has chunk 1 first.
        assert_eq!(position[1..9], (1024u64 + 100).to_le_bytes());
        let refused = |bytes: &[u8], part: u32, want: &str| {
            let error = factory(part, 3).seek(bytes).unwrap_err();
            assert!(
                error.starts_with("generator position: ") && error.contains(want),
                "{error}"
            );
        };
        refused(&position[..24], 1, "24 bytes, expected 25 bytes");
        refused(&[], 1, "0 bytes, expected 25 bytes");
        let mut other = position.clone();
        other[0] = 2;
        refused(&other, 1, "version 2, expected version 1");
        refused(
            &position,
            2,
            "saved by partition 1 of 3 over 5000 events, but this is partition 2 of 3",
        );
        let with_next = |next: u64| {
            let mut bytes = position.clone();
            bytes[1..9].copy_from_slice(&next.to_le_bytes());
            bytes
        };
        refused(
            &with_next(5),
            1,
            "event 5 is not one partition 1 of 3 produces",
        );
        refused(&with_next(5001), 1, "event 5001 is not one");
        refused(&with_next(u64::MAX), 1, "is not one");
        // The end, and the last event of the partition's last chunk (4096..5000
        // is chunk 4, partition 1's).
        for next in [5000, 4999] {
            let mut source = factory(1, 3);
            source.seek(&with_next(next)).unwrap();
            let mut out = Vec::new();
            while step(&mut *source, 100, &mut out) {}
            assert_eq!(out.len() as u64, 5000 - next);
        }
    }
}

/// q4, first phase: the closing price of each auction, emitted once the watermark
/// passes its `expires`. Its state is kept by key group (the auction's): each
/// group's auctions and their closing times.
struct ClosingPrices {
    groups: KeyGroups<AuctionGroup>,
    watermark_ms: i64,
    /// Event time of the next sweep of bids whose auction can no longer come.
    next_sweep_ms: i64,
}

impl Default for ClosingPrices {
    fn default() -> Self {
        ClosingPrices {
            groups: KeyGroups::default(),
            watermark_ms: i64::MIN,
            next_sweep_ms: i64::MIN,
        }
    }
}

impl ClosingPrices {
    /// Auctions (or early bids of one) held, over all key groups.
    #[cfg(test)]
    fn held_auctions(&self) -> usize {
        self.groups.iter().map(|(_, g)| g.auctions.len()).sum()
    }
}

/// How often (in event time) `ClosingPrices` drops bids whose auction can no longer come.
const Q4_SWEEP_MS: i64 = 1_000;

#[derive(Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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

/// One key group of q4's auctions.
#[derive(Default)]
struct AuctionGroup {
    auctions: IdMap<u64, AuctionState>,
    /// `(expires, id)` of every auction that has arrived, in closing order:
    /// derived from `auctions`, so not encoded. A set of pairs rather than
    /// ids by `expires`: a group holds few auctions of one `expires`, and a
    /// list per time would be an allocation per auction.
    closing: BTreeSet<(i64, u64)>,
}

impl GroupState for AuctionGroup {
    fn is_empty(&self) -> bool {
        self.auctions.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        self.auctions.encode(out);
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let auctions: IdMap<u64, AuctionState> = GroupState::decode(bytes)?;
        let closing = auctions
            .iter()
            .filter_map(|(&id, state)| state.auction.map(|(_, expires, _)| (expires, id)))
            .collect();
        Ok(AuctionGroup { auctions, closing })
    }
}

impl JoinOperator<Q4Auction, Q4Bid, Q4Closing> for ClosingPrices {
    fn on_left(&mut self, auctions: Vec<Q4Auction>, _out: &mut Vec<Q4Closing>) {
        for a in auctions {
            let group = self.groups.for_key(a.id);
            let state = group.auctions.entry(a.id).or_default();
            state.auction = Some((a.date_time, a.expires, a.category));
            for (date_time, price) in std::mem::take(&mut state.early_bids) {
                state.bid(date_time, price);
            }
            group.closing.insert((a.expires, a.id));
        }
    }

    fn on_right(&mut self, bids: Vec<Q4Bid>, _out: &mut Vec<Q4Closing>) {
        for b in bids {
            let group = self.groups.group_of(b.auction);
            // Its auction, if valid, is no later than the bid: when the bid is
            // behind the watermark and the auction is not here, it never comes.
            if b.date_time < self.watermark_ms
                && !self.groups.get(group).auctions.contains_key(&b.auction)
            {
                continue;
            }
            self.groups
                .get_mut(group)
                .auctions
                .entry(b.auction)
                .or_default()
                .bid(b.date_time, b.price)
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Q4Closing>) {
        self.watermark_ms = watermark_ms;
        let end = watermark_ms == i64::MAX;
        let sweep = watermark_ms >= self.next_sweep_ms && !end;
        if sweep {
            self.next_sweep_ms = watermark_ms.saturating_add(Q4_SWEEP_MS);
        }
        for group in 0..self.groups.len() {
            let current = self.groups.get(group);
            let due = current
                .closing
                .first()
                .is_some_and(|&(expires, _)| expires < watermark_ms || end);
            let stale = sweep
                && current.auctions.values().any(|state| {
                    state.auction.is_none()
                        && state.early_bids.iter().all(|&(t, _)| t < watermark_ms)
                });
            if !(due || stale || (end && !current.is_empty())) {
                continue;
            }
            let current = self.groups.get_mut(group);
            if stale {
                current.auctions.retain(|_, state| {
                    state.auction.is_some()
                        || state.early_bids.iter().any(|&(t, _)| t >= watermark_ms)
                });
            }
            // An auction closes when the watermark passes `expires` (bids at
            // `expires` count).
            while let Some(&(expires, id)) = current.closing.first() {
                if expires >= watermark_ms && !end {
                    break;
                }
                current.closing.pop_first();
                let Some(state) = current.auctions.remove(&id) else {
                    continue;
                };
                if let (Some((_, _, category)), Some(price)) = (state.auction, state.max_price) {
                    out.push(Q4Closing { category, price });
                }
            }
            if end {
                current.auctions.clear(); // bids whose auction never came
            }
        }
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.groups)
    }
}

/// q4, second phase: the running average closing price per category, as
/// `(sum, count)` by category.
#[derive(Default)]
struct Q4Average {
    totals: KeyedState<(u128, u64)>,
}

impl Operator<Q4Closing, Q4> for Q4Average {
    fn on_records(&mut self, closed: Vec<Q4Closing>, out: &mut Vec<Q4>) {
        for Q4Closing { category, price } in closed {
            let (sum, count) = self.totals.for_key(category).entry(category).or_default();
            *sum += price as u128;
            *count += 1;
            out.push(Q4 {
                category,
                avg: *sum as f64 / *count as f64,
            });
        }
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.totals)
    }
}

/// Formats a partition's rows as JSON Lines for its writer.
struct JsonSink {
    writer: Box<dyn LineWriter>,
    lines: Vec<u8>,
}

impl<T: Data + Serialize> Sink<T> for JsonSink {
    fn write(&mut self, records: &[T]) {
        self.lines.clear();
        for row in records {
            // Writing JSON into memory cannot fail.
            let _ = serde_json::to_writer(&mut self.lines, row);
            self.lines.push(b'\n');
        }
        self.writer.write_lines(&self.lines);
    }

    fn finish(&mut self) {
        self.writer.finish();
    }

    fn seal(&mut self, _epoch: u64) -> Result<Vec<Sealed>, String> {
        self.writer.seal()
    }
}

/// A sink that only counts (the engine counts outputs for every sink).
pub struct NullSink;

impl<T: Data> Sink<T> for NullSink {
    fn write(&mut self, _records: &[T]) {}
    fn stateless(&self) -> bool {
        true
    }
}

/// A line writer that keeps every row as a JSON value, for tests and small runs.
pub struct CollectJson(pub Arc<Mutex<Vec<serde_json::Value>>>);

impl LineWriter for CollectJson {
    fn write_lines(&mut self, lines: &[u8]) {
        let rows = lines
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("the sink writes valid JSON"));
        self.0.lock().expect("collect lock poisoned").extend(rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn bid(auction: u64, date_time: i64, price: u64) -> Q4Bid {
        Q4Bid {
            auction,
            date_time,
            price,
        }
    }

    fn auction(id: u64, date_time: i64, expires: i64) -> Q4Auction {
        Q4Auction {
            id,
            date_time,
            expires,
            category: 10,
        }
    }

    #[test]
    fn q4_drops_bids_whose_auction_can_no_longer_come() {
        let mut closing = ClosingPrices::default();
        let mut out = Vec::new();
        // A bid ahead of its auction is held; the auction then arrives and closes.
        closing.on_right(vec![bid(7, 100, 30)], &mut out);
        closing.on_left(vec![auction(7, 90, 500)], &mut out);
        // A bid for an auction that never comes is held only until the watermark
        // passes it; one already behind the watermark is not held at all.
        closing.on_right(vec![bid(8, 120, 40)], &mut out);
        assert_eq!(closing.held_auctions(), 2);
        closing.on_watermark(200, &mut out);
        assert_eq!(closing.held_auctions(), 1, "auction 8's bid is swept");
        closing.on_right(vec![bid(9, 150, 50)], &mut out);
        assert_eq!(
            closing.held_auctions(),
            1,
            "a bid behind the watermark is not held"
        );
        closing.on_watermark(501, &mut out);
        assert!(matches!(
            out.as_slice(),
            [Q4Closing {
                category: 10,
                price: 30
            }]
        ));
        assert_eq!(closing.held_auctions(), 0);
    }

    #[test]
    fn rows_are_json_with_the_column_names() {
        let collected = Arc::new(Mutex::new(Vec::new()));
        let writer = CollectJson(collected.clone());
        let mut sink = JsonSink {
            writer: Box::new(writer),
            lines: Vec::new(),
        };
        let row = Q3 {
            name: Cow::Borrowed("Ann"),
            city: Cow::Borrowed("Boise"),
            state: Cow::Borrowed("ID"),
            id: 7,
        };
        Sink::<Q3>::write(&mut sink, &[row]);
        let rows = collected.lock().unwrap();
        assert_eq!(
            rows[0],
            serde_json::json!({"name": "Ann", "city": "Boise", "state": "ID", "id": 7})
        );
    }
}

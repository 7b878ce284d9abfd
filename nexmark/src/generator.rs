//! The Nexmark event generator: event number `n` is computed from `(seed, n)` alone,
//! with a counter-based hash RNG, so the sequence can be split across cores, generated
//! in any order and replayed after a failure, always giving the same events.
//!
//! Rules (NEXMARK.md): `n % 50 == 0` is a person, `1..=3` an auction, else a bid;
//! ids are dense from 1000; `date_time = base_time + offset(n)`, the scheduled
//! emission offset of `n` under the nominal rate (`floor(n * 1000 / rate)` for a
//! constant rate; step by step for a rate schedule, see `dirigo_engine::dataflow::pace`).
//! Strings are borrowed from static pools built once, so generating a bid allocates
//! nothing.
//!
//! Auctions stay open 2 to 60 s of event time, but never less than it takes until no
//! bid can pick them any more (the next `in_flight_auctions` auctions exist): at low
//! nominal rates (below about 30 events/s with 100 auctions in flight) that is longer
//! than a minute. So every bid's auction is open at the bid's time, for any rate.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use dirigo_engine::dataflow::RateSchedule;

use super::event::{Auction, Bid, Event, Person};

/// First person id and first auction id.
pub const FIRST_ID: u64 = 1000;
/// Events in one block of the fixed mix: 1 person, 3 auctions, 46 bids.
pub const EVENTS_PER_BLOCK: u64 = 50;
/// Auctions in one block of the mix.
pub const AUCTIONS_PER_BLOCK: u64 = 3;

/// Target average nominal sizes (NEXMARK.md), in bytes.
const PERSON_NOMINAL_BYTES: usize = 200;
const AUCTION_NOMINAL_BYTES: usize = 500;
const BID_NOMINAL_BYTES: usize = 100;

/// Shortest time an auction stays open, and the random extra on top, in ms.
const MIN_OPEN_MS: i64 = 2_000;
const EXTRA_OPEN_MS: u64 = 58_000;

/// Generator settings. `Default` gives the contract's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratorConfig {
    pub seed: u64,
    /// Nominal rate: event time advances by 1 s every `rate` events, step by
    /// step for a schedule (a paced run's schedule, so that event time follows
    /// wall time).
    pub rate: RateSchedule,
    /// Event time of event 0, in ms since the epoch.
    pub base_time_ms: i64,
    /// A bid picks its auction among the last this many auctions.
    pub in_flight_auctions: u64,
    /// Bidders and sellers are picked among the last this many people.
    pub active_people: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 0,
            rate: RateSchedule::constant(10_000_000),
            // Not a multiple of 10 s, so that window alignment is exercised.
            base_time_ms: 1_700_000_001_234,
            in_flight_auctions: 100,
            active_people: 1000,
        }
    }
}

/// A `GeneratorConfig` field that must be at least 1 was 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratorConfigError {
    pub field: &'static str,
}

impl fmt::Display for GeneratorConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nexmark generator: {} must be at least 1", self.field)
    }
}

impl std::error::Error for GeneratorConfigError {}

/// Deterministic, splittable Nexmark generator. Cheap to clone; share freely.
#[derive(Clone, Debug)]
pub struct Generator {
    config: GeneratorConfig,
    seed_key: u64,
    pools: &'static Pools,
}

impl Generator {
    pub fn new(config: GeneratorConfig) -> Result<Generator, GeneratorConfigError> {
        for (value, field) in [
            (config.in_flight_auctions, "in_flight_auctions"),
            (config.active_people, "active_people"),
        ] {
            if value == 0 {
                return Err(GeneratorConfigError { field });
            }
        }
        Ok(Generator {
            seed_key: mix64(config.seed ^ 0x6e65_786d_6172_6b21),
            config,
            pools: pools(),
        })
    }

    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// Event time of event `n`, in ms since the epoch: `base + offset(n)`, for a
    /// constant rate `base + floor(n*1000/rate)`.
    pub fn date_time_ms(&self, n: u64) -> i64 {
        let offset_ms = i64::try_from(self.config.rate.offset_ms(n)).unwrap_or(i64::MAX);
        self.config.base_time_ms.saturating_add(offset_ms)
    }

    /// Event number `n`.
    pub fn event(&self, n: u64) -> Event {
        self.make(n, self.date_time_ms(n))
    }

    /// Appends events `range` to `out` (does not clear it), in order.
    /// Same events as calling [`Generator::event`] for each number, only faster.
    pub fn fill(&self, range: Range<u64>, out: &mut Vec<Event>) {
        out.reserve((range.end - range.start).try_into().unwrap_or(0));
        self.fill_with(range, |event| out.push(event));
    }

    /// Hands events `range` to `f`, in order: lets a caller build its own record
    /// around each event without an intermediate vector.
    #[inline]
    pub fn fill_with(&self, range: Range<u64>, mut f: impl FnMut(Event)) {
        if range.is_empty() {
            return;
        }
        let mut clock = EventClock::new(self, range.start);
        for n in range {
            f(self.make(n, clock.now_ms()));
            clock.advance(n);
        }
    }

    fn make(&self, n: u64, date_time: i64) -> Event {
        let key = mix64(self.seed_key ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        match n % EVENTS_PER_BLOCK {
            0 => Event::Person(Box::new(self.person(n, key, date_time))),
            1..=3 => Event::Auction(Box::new(self.auction(n, key, date_time))),
            _ => Event::Bid(self.bid(n, key, date_time)),
        }
    }

    /// The id of the person registered at or before event `n` that a bid or auction at
    /// `n` names: among the last `active_people`, hot (a multiple of 4) with prob. 3/4.
    fn pick_person(&self, n: u64, r_pick: u64, r_hot: u64) -> u64 {
        let people = n / EVENTS_PER_BLOCK + 1;
        let window = people.min(self.config.active_people);
        let last = FIRST_ID + people - 1;
        let lowest = last + 1 - window;
        let id = last - below(r_pick, window);
        let hot = id & !3;
        if r_hot & 3 != 0 && hot >= lowest {
            hot
        } else {
            id
        }
    }

    fn person(&self, n: u64, key: u64, date_time: i64) -> Person {
        let p = self.pools;
        let r0 = stream(key, 0);
        let r1 = stream(key, 1);
        let name = p.names[(r0 & POOL_MASK) as usize];
        let email = p.emails[((r0 >> 16) & POOL_MASK) as usize];
        let card = p.credit_cards[((r0 >> 32) & POOL_MASK) as usize];
        let city = CITIES[below(r1, CITIES.len() as u64) as usize];
        let state = STATES[below(r1 << 8, STATES.len() as u64) as usize];
        let base = 16 + name.len() + email.len() + card.len() + city.len() + state.len();
        Person {
            id: FIRST_ID + n / EVENTS_PER_BLOCK,
            name: Cow::Borrowed(name),
            email_address: Cow::Borrowed(email),
            credit_card: Cow::Borrowed(card),
            city: Cow::Borrowed(city),
            state: Cow::Borrowed(state),
            date_time,
            extra: Cow::Borrowed(p.extra(PERSON_NOMINAL_BYTES, base, stream(key, 2))),
        }
    }

    fn auction(&self, n: u64, key: u64, date_time: i64) -> Auction {
        let p = self.pools;
        let index = auction_index(n);
        let r0 = stream(key, 0);
        let r1 = stream(key, 1);
        let r2 = stream(key, 2);
        let item = p.item_names[(r0 & POOL_MASK) as usize];
        let description = p.descriptions[((r0 >> 16) & POOL_MASK) as usize];
        let initial_bid = p.price(r1);
        let reserve = initial_bid.saturating_add(p.price(r2));
        // Open long enough for every bid that may pick this auction: bids pick among
        // the last `in_flight_auctions`, so the last one that can name it comes before
        // auction `index + in_flight_auctions` is created.
        let displaced_at =
            auction_event_number(index.saturating_add(self.config.in_flight_auctions));
        let reachable_until = self.date_time_ms(displaced_at);
        let open_ms = MIN_OPEN_MS + below(stream(key, 3), EXTRA_OPEN_MS + 1) as i64;
        let expires = date_time.saturating_add(open_ms).max(reachable_until);
        let base = 56 + item.len() + description.len();
        Auction {
            id: FIRST_ID + index,
            item_name: Cow::Borrowed(item),
            description: Cow::Borrowed(description),
            initial_bid,
            reserve,
            date_time,
            expires,
            seller: self.pick_person(n, stream(key, 4), r0 >> 40),
            category: 10 + below(stream(key, 6), 5),
            extra: Cow::Borrowed(p.extra(AUCTION_NOMINAL_BYTES, base, stream(key, 5))),
        }
    }

    fn bid(&self, n: u64, key: u64, date_time: i64) -> Bid {
        let p = self.pools;
        // Three draws: r0 picks the auction (high bits) and the bidder (low bits,
        // rotated up); r1 sizes the extra; r2 gives the price (bits 22..64) and, in
        // its low bits, the hot flags, the channel and the url.
        let r0 = stream(key, 0);
        let r1 = stream(key, 1);
        let r2 = stream(key, 2);
        // Auctions created before event n (a bid's own block already has its 3).
        let auctions = auctions_before(n);
        let window = auctions.min(self.config.in_flight_auctions);
        let last = FIRST_ID + auctions - 1;
        let lowest = last + 1 - window;
        let picked = last - below(r0, window);
        let hot = picked & !1;
        let auction = if r2 & 1 == 0 && hot >= lowest {
            hot
        } else {
            picked
        };
        let channel = CHANNELS[((r2 >> 4) & 3) as usize % CHANNELS.len()];
        let url = p.urls[((r2 >> 6) & POOL_MASK) as usize];
        let base = 32 + channel.len() + url.len();
        Bid {
            auction,
            bidder: self.pick_person(n, r0.rotate_left(32), r2 >> 2),
            price: p.price(r2),
            channel: Cow::Borrowed(channel),
            url: Cow::Borrowed(url),
            date_time,
            extra: Cow::Borrowed(p.extra(BID_NOMINAL_BYTES, base, r1)),
        }
    }
}

/// Splits events `0..total_events` into `parts` contiguous ranges whose lengths differ
/// by at most one (the first ones are longer). Suits bounded generation (files, tests);
/// a streaming source split this way would have cores far apart in event time, so use
/// [`interleaved_chunks`] there.
pub fn split(total_events: u64, parts: usize) -> Vec<Range<u64>> {
    let parts_u64 = parts.max(1) as u64;
    let (len, longer) = (total_events / parts_u64, total_events % parts_u64);
    let mut start = 0;
    (0..parts_u64)
        .map(|i| {
            let end = start + len + u64::from(i < longer);
            let range = start..end;
            start = end;
            range
        })
        .collect()
}

/// The chunks of `span` that part `part` of `parts` generates when the sequence is
/// interleaved by chunks of `chunk_events`: chunk `i` goes to part `i % parts`, so all
/// parts advance through event time together (what a streaming source wants).
pub fn interleaved_chunks(
    span: Range<u64>,
    part: usize,
    parts: usize,
    chunk_events: u64,
) -> impl Iterator<Item = Range<u64>> {
    let chunk = chunk_events.max(1);
    let stride = chunk.saturating_mul(parts.max(1) as u64);
    let first = span.start.saturating_add(chunk.saturating_mul(part as u64));
    let end = span.end;
    let valid = part < parts.max(1);
    std::iter::successors(valid.then_some(first), move |&s| s.checked_add(stride))
        .take_while(move |&s| s < end)
        .map(move |s| s..s.saturating_add(chunk).min(end))
}

/// Number of bids among events `0..n` (the fixed mix: 46 of every 50). What
/// a query that maps every bid to one row (q0, q1) outputs for `n` events.
pub fn bids_before(n: u64) -> u64 {
    let bids_per_block = EVENTS_PER_BLOCK - 1 - AUCTIONS_PER_BLOCK;
    let in_block = (n % EVENTS_PER_BLOCK).saturating_sub(1 + AUCTIONS_PER_BLOCK);
    bids_per_block * (n / EVENTS_PER_BLOCK) + in_block
}

/// Number of auctions created by events `0..n` (before event `n`).
fn auctions_before(n: u64) -> u64 {
    let in_block = (n % EVENTS_PER_BLOCK)
        .saturating_sub(1)
        .min(AUCTIONS_PER_BLOCK);
    AUCTIONS_PER_BLOCK * (n / EVENTS_PER_BLOCK) + in_block
}

/// 0-based index of the auction created by auction event `n`.
fn auction_index(n: u64) -> u64 {
    AUCTIONS_PER_BLOCK * (n / EVENTS_PER_BLOCK) + (n % EVENTS_PER_BLOCK - 1)
}

/// Event number that creates the auction with 0-based index `index`.
fn auction_event_number(index: u64) -> u64 {
    (index / AUCTIONS_PER_BLOCK)
        .saturating_mul(EVENTS_PER_BLOCK)
        .saturating_add(index % AUCTIONS_PER_BLOCK + 1)
}

/// Event time by increments, avoiding a division per event in `fill`: within a
/// step of the rate schedule, `floor(k * 1000 / rate)` as a quotient and a
/// remainder; a new step (rare) starts over from its own start.
struct EventClock<'a> {
    schedule: &'a RateSchedule,
    /// Event time of event 0 (the generator's base).
    base_time_ms: i64,
    /// Events left in this step, counting the current one (`u64::MAX` in the last).
    left_in_step: u64,
    /// Event time at which this step starts.
    base_ms: i64,
    rate: u64,
    quotient_ms: u64,
    remainder: u64,
    step_ms: u64,
    step_remainder: u64,
}

impl<'a> EventClock<'a> {
    fn new(generator: &'a Generator, n: u64) -> EventClock<'a> {
        let schedule = &generator.config.rate;
        let mut clock = EventClock {
            schedule,
            base_time_ms: generator.config.base_time_ms,
            left_in_step: 0,
            base_ms: generator.config.base_time_ms,
            rate: 1,
            quotient_ms: 0,
            remainder: 0,
            step_ms: 0,
            step_remainder: 0,
        };
        clock.enter(n);
        clock
    }

    /// Point the clock at event `n`.
    fn enter(&mut self, n: u64) {
        let (step, start_ms, into) = self.schedule.locate(n);
        let (rate, records) = self.schedule.step_span(step);
        let milli_events = u128::from(into) * 1000;
        let quotient = milli_events / u128::from(rate);
        let start_ms = i64::try_from(start_ms).unwrap_or(i64::MAX);
        self.base_ms = self.base_time_ms.saturating_add(start_ms);
        self.left_in_step = records.saturating_sub(into);
        self.rate = rate;
        self.quotient_ms = quotient.min(u128::from(u64::MAX)) as u64;
        self.remainder = (milli_events % u128::from(rate)) as u64;
        self.step_ms = 1000 / rate;
        self.step_remainder = 1000 % rate;
    }

    #[inline]
    fn now_ms(&self) -> i64 {
        let offset = i64::try_from(self.quotient_ms).unwrap_or(i64::MAX);
        self.base_ms.saturating_add(offset)
    }

    /// Move to the next event, `n + 1` when the clock stands at `n`.
    #[inline]
    fn advance(&mut self, n: u64) {
        self.left_in_step -= 1;
        if self.left_in_step == 0 {
            self.next_step(n + 1);
            return;
        }
        self.quotient_ms = self.quotient_ms.saturating_add(self.step_ms);
        self.remainder += self.step_remainder;
        if self.remainder >= self.rate {
            self.remainder -= self.rate;
            self.quotient_ms = self.quotient_ms.saturating_add(1);
        }
    }

    /// Event `n` is the first of the next step of the schedule.
    #[cold]
    fn next_step(&mut self, n: u64) {
        self.enter(n);
        debug_assert_eq!(self.schedule.locate(n).2, 0, "a step starts at {n}");
    }
}

// ---------------------------------------------------------------------------
// Counter-based randomness.

/// splitmix64's finalizer: a bijective 64-bit mix.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Independent sub-stream `k` of an event's key.
#[inline]
fn stream(key: u64, k: u64) -> u64 {
    mix64(key.wrapping_add((k + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)))
}

/// Uniform in `0..bound` (bound >= 1) from the high bits of `r`.
#[inline]
fn below(r: u64, bound: u64) -> u64 {
    ((u128::from(r) * u128::from(bound)) >> 64) as u64
}

// ---------------------------------------------------------------------------
// Static string pools, built once.

const POOL_LEN: usize = 1024;
const POOL_MASK: u64 = POOL_LEN as u64 - 1;
const PAD_LEN: usize = 64 * 1024;
const PRICE_STEPS: usize = 1024;

const CHANNELS: &[&str] = &["Google", "Facebook", "Baidu", "Apple"];
const CITIES: &[&str] = &[
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
    "Cheyenne",
];
const STATES: &[&str] = &["AZ", "CA", "ID", "OR", "WA", "WY"];
const FIRST_NAMES: &[&str] = &[
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
    "Maria", "Ana", "Omar", "Wei", "Priya",
];
const LAST_NAMES: &[&str] = &[
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris",
    "Garcia", "Chen", "Okafor", "Novak", "Rossi", "Kim", "Sato",
];

struct Pools {
    pad: &'static str,
    names: Vec<&'static str>,
    emails: Vec<&'static str>,
    credit_cards: Vec<&'static str>,
    item_names: Vec<&'static str>,
    descriptions: Vec<&'static str>,
    urls: Vec<&'static str>,
    /// `prices[i] = 100 * 10^(6 i / PRICE_STEPS)`, for i in `0..=PRICE_STEPS`.
    prices: Vec<u64>,
}

impl fmt::Debug for Pools {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pools")
    }
}

impl Pools {
    /// About `100 * 10^uniform(0..6)`: log-uniform over six decades, from 100 to 10^8,
    /// interpolated in a table (a `powf` per bid would dominate the generator's cost).
    #[inline]
    fn price(&self, r: u64) -> u64 {
        let step = (r >> 54) as usize; // 10 bits: 0..1024
        let frac = (r >> 22) & 0xffff_ffff;
        let (lo, hi) = (self.prices[step], self.prices[step + 1]);
        lo + (((hi - lo) * frac) >> 32)
    }

    /// A slice of the pad so that `base + len` averages `target` (±10%, uniform).
    #[inline]
    fn extra(&self, target: usize, base: usize, r: u64) -> &'static str {
        let deficit = target.saturating_sub(base);
        let jitter = (target / 10).min(deficit) as u64;
        let len = deficit + below(r, 2 * jitter + 1) as usize - jitter as usize;
        let len = len.min(PAD_LEN);
        let start = below(r << 32, (PAD_LEN - len + 1) as u64) as usize;
        &self.pad[start..start + len]
    }
}

fn pools() -> &'static Pools {
    static POOLS: OnceLock<Pools> = OnceLock::new();
    POOLS.get_or_init(build_pools)
}

/// Sequential splitmix64 for building the pools (fixed seed: pools are part of the
/// format, identical for every generator seed).
struct PoolRng(u64);

impl PoolRng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
    fn below(&mut self, bound: u64) -> u64 {
        below(self.next(), bound)
    }
    fn lowercase(&mut self, out: &mut String, len: u64) {
        for _ in 0..len {
            out.push(char::from(b'a' + self.below(26) as u8));
        }
    }
}

/// Builds `POOL_LEN` strings with `make`, stored in one leaked buffer (built once per
/// process) and handed out as `&'static str` slices.
fn pool(rng: &mut PoolRng, mut make: impl FnMut(&mut PoolRng, &mut String)) -> Vec<&'static str> {
    let mut text = String::new();
    let mut ends = Vec::with_capacity(POOL_LEN);
    for _ in 0..POOL_LEN {
        make(rng, &mut text);
        ends.push(text.len());
    }
    let text: &'static str = Box::leak(text.into_boxed_str());
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let s = &text[start..end];
            start = end;
            s
        })
        .collect()
}

fn build_pools() -> Pools {
    let mut rng = PoolRng(0x005e_ed0f_4e78_6d61);
    let mut pad = String::with_capacity(PAD_LEN);
    rng.lowercase(&mut pad, PAD_LEN as u64);
    let names = pool(&mut rng, |rng, s| {
        s.push_str(FIRST_NAMES[rng.below(FIRST_NAMES.len() as u64) as usize]);
        s.push(' ');
        s.push_str(LAST_NAMES[rng.below(LAST_NAMES.len() as u64) as usize]);
    });
    let emails = pool(&mut rng, |rng, s| {
        let len = 5 + rng.below(6);
        rng.lowercase(s, len);
        s.push('@');
        let len = 4 + rng.below(5);
        rng.lowercase(s, len);
        s.push_str(".com");
    });
    let credit_cards = pool(&mut rng, |rng, s| {
        for group in 0..4 {
            if group > 0 {
                s.push(' ');
            }
            for _ in 0..4 {
                s.push(char::from(b'0' + rng.below(10) as u8));
            }
        }
    });
    let item_names = pool(&mut rng, |rng, s| {
        let len = 5 + rng.below(11);
        rng.lowercase(s, len);
    });
    let descriptions = pool(&mut rng, |rng, s| {
        let words = 3 + rng.below(6);
        for w in 0..words {
            if w > 0 {
                s.push(' ');
            }
            let len = 3 + rng.below(8);
            rng.lowercase(s, len);
        }
    });
    let urls = pool(&mut rng, |rng, s| {
        s.push_str("https://www.nexmark.com/");
        let len = 4 + rng.below(5);
        rng.lowercase(s, len);
        s.push_str("/item.htm?query=1");
    });
    let prices = (0..=PRICE_STEPS)
        .map(|i| (100.0 * 10f64.powf(6.0 * i as f64 / PRICE_STEPS as f64)).round() as u64)
        .collect();
    Pools {
        pad: Box::leak(pad.into_boxed_str()),
        names,
        emails,
        credit_cards,
        item_names,
        descriptions,
        urls,
        prices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn bids_before_counts_the_bids_the_generator_makes() {
        let generator = generator(0, 1_000_000);
        let mut bids = 0;
        for n in 0..=260 {
            assert_eq!(bids_before(n), bids, "events 0..{n}");
            bids += u64::from(matches!(generator.event(n), Event::Bid(_)));
        }
        assert_eq!(bids_before(1_000_000), 920_000);
    }

    fn generator(seed: u64, events_per_second: u64) -> Generator {
        Generator::new(GeneratorConfig {
            seed,
            rate: RateSchedule::constant(events_per_second),
            ..GeneratorConfig::default()
        })
        .unwrap()
    }

    fn events(g: &Generator, range: Range<u64>) -> Vec<Event> {
        let mut out = Vec::new();
        g.fill(range, &mut out);
        out
    }

    #[test]
    fn nexmark_generator_rejects_zero_window() {
        let err = Generator::new(GeneratorConfig {
            in_flight_auctions: 0,
            ..GeneratorConfig::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "in_flight_auctions");
        assert_ne!(GeneratorConfig::default().base_time_ms % 10_000, 0);
    }

    #[test]
    fn nexmark_generator_is_deterministic_across_splits() {
        for rate in [1, 7, 1000, 10_000_000] {
            let g = generator(42, rate);
            let whole = events(&g, 0..5000);
            for (i, e) in whole.iter().enumerate().step_by(37) {
                assert_eq!(&g.event(i as u64), e, "event({i}) differs from fill");
            }
            // Parts generated in reverse order, by a separately built generator.
            let g2 = generator(42, rate);
            for parts in [1, 2, 3, 7] {
                let mut pieces: Vec<(u64, Vec<Event>)> = split(5000, parts)
                    .into_iter()
                    .rev()
                    .map(|r| (r.start, events(&g2, r)))
                    .collect();
                pieces.sort_by_key(|p| p.0);
                let joined: Vec<Event> = pieces.into_iter().flat_map(|p| p.1).collect();
                assert_eq!(joined, whole, "rate {rate}, {parts} parts");
            }
            let mut interleaved = vec![None; 5000];
            for part in 0..3 {
                for chunk in interleaved_chunks(0..5000, part, 3, 64) {
                    for e in events(&g2, chunk.clone()).into_iter().zip(chunk) {
                        interleaved[e.1 as usize] = Some(e.0);
                    }
                }
            }
            let interleaved: Vec<Event> = interleaved.into_iter().map(Option::unwrap).collect();
            assert_eq!(interleaved, whole);
        }
        assert_ne!(
            events(&generator(1, 1000), 0..100),
            events(&generator(2, 1000), 0..100)
        );
        // fill starting far in the sequence agrees with event().
        let g = generator(3, 3);
        let far = 1 << 40;
        assert_eq!(
            events(&g, far..far + 100),
            (far..far + 100).map(|n| g.event(n)).collect::<Vec<_>>()
        );
    }

    /// Under a rate schedule, event time is the schedule's offset of `n`: the
    /// same from `event`, from `fill` over any split (ranges that start and end
    /// inside steps and cross several), and never going backwards.
    #[test]
    fn nexmark_schedule_event_time() {
        use dirigo_engine::dataflow::RateStep;
        let step = |per_s, duration_ms| RateStep { per_s, duration_ms };
        let schedule = RateSchedule::new(&[
            step(1000, 1000),
            step(30_000, 100),
            step(7, 1500),
            step(500, 0),
        ])
        .unwrap();
        let g = Generator::new(GeneratorConfig {
            seed: 5,
            rate: schedule.clone(),
            ..GeneratorConfig::default()
        })
        .unwrap();
        let base = GeneratorConfig::default().base_time_ms;
        let whole = events(&g, 0..8000);
        let mut last = i64::MIN;
        for (n, e) in whole.iter().enumerate() {
            let n = n as u64;
            assert_eq!(
                e.date_time(),
                base + schedule.offset_ms(n) as i64,
                "event {n}"
            );
            assert_eq!(&g.event(n), e, "event({n}) differs from fill");
            assert!(e.date_time() >= last, "time went backwards at {n}");
            last = e.date_time();
        }
        // 1000 events in the first second, 3000 in the next 100 ms, 11 in 1.5 s.
        assert_eq!(whole[999].date_time(), base + 999);
        assert_eq!(whole[1000].date_time(), base + 1000);
        assert_eq!(whole[4000].date_time(), base + 1100);
        assert_eq!(whole[4011].date_time(), base + 2600);
        for parts in [2, 3, 7, 64] {
            let mut pieces: Vec<Event> = Vec::new();
            for r in split(8000, parts).into_iter() {
                pieces.extend(events(&g, r));
            }
            assert_eq!(pieces, whole, "{parts} parts");
            let mut interleaved = vec![None; 8000];
            for part in 0..parts {
                for chunk in interleaved_chunks(0..8000, part, parts, 37) {
                    for e in events(&g, chunk.clone()).into_iter().zip(chunk) {
                        interleaved[e.1 as usize] = Some(e.0);
                    }
                }
            }
            let interleaved: Vec<Event> = interleaved.into_iter().map(Option::unwrap).collect();
            assert_eq!(interleaved, whole, "{parts} interleaved parts");
        }
        // One step is the constant rate, event for event.
        let one = Generator::new(GeneratorConfig {
            seed: 5,
            rate: RateSchedule::new(&[step(1000, 5000)]).unwrap(),
            ..GeneratorConfig::default()
        })
        .unwrap();
        assert_eq!(events(&one, 0..5000), events(&generator(5, 1000), 0..5000));
    }

    #[test]
    fn nexmark_split_covers_range() {
        assert_eq!(split(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        let chunks: Vec<_> = interleaved_chunks(5..30, 1, 2, 10).collect();
        assert_eq!(chunks, vec![15..25]);
        let chunks: Vec<_> = interleaved_chunks(5..30, 0, 2, 10).collect();
        assert_eq!(chunks, vec![5..15, 25..30]);
    }

    #[test]
    fn nexmark_mix_ids_and_times() {
        let g = generator(9, 10_000_000);
        let evs = events(&g, 0..100_000);
        let (mut people, mut auctions, mut bids) = (0u64, 0u64, 0u64);
        let mut last_time = i64::MIN;
        for (n, e) in evs.iter().enumerate() {
            assert!(e.date_time() >= last_time, "time went backwards at {n}");
            last_time = e.date_time();
            match e {
                Event::Person(p) => {
                    assert_eq!(p.id, FIRST_ID + people);
                    people += 1;
                }
                Event::Auction(a) => {
                    assert_eq!(a.id, FIRST_ID + auctions);
                    auctions += 1;
                }
                Event::Bid(_) => bids += 1,
            }
        }
        assert_eq!((people, auctions, bids), (2000, 6000, 92_000));
        assert_eq!(g.event(0).date_time(), 1_700_000_001_234);
        assert_eq!(
            generator(0, 1000).event(1999).date_time(),
            1_700_000_001_234 + 1999
        );
        assert_eq!(
            generator(0, 3).event(7).date_time(),
            1_700_000_001_234 + 2333
        );
    }

    #[test]
    fn nexmark_references_exist_and_auctions_are_open() {
        for rate in [1, 1000, 10_000_000] {
            for seed in [0, 1, 0xdead_beef] {
                for config in [
                    GeneratorConfig {
                        seed,
                        rate: RateSchedule::constant(rate),
                        ..GeneratorConfig::default()
                    },
                    GeneratorConfig {
                        seed,
                        rate: RateSchedule::constant(rate),
                        in_flight_auctions: 1,
                        active_people: 1,
                        ..GeneratorConfig::default()
                    },
                ] {
                    let g = Generator::new(config).unwrap();
                    let mut auctions: HashMap<u64, (i64, i64)> = HashMap::new();
                    let mut people = 0u64;
                    for e in events(&g, 0..60_000) {
                        match e {
                            Event::Person(_) => people += 1,
                            Event::Auction(a) => {
                                assert!(a.expires > a.date_time);
                                assert!(a.reserve >= a.initial_bid);
                                assert!((10..15).contains(&a.category));
                                assert!(a.seller >= FIRST_ID && a.seller < FIRST_ID + people);
                                auctions.insert(a.id, (a.date_time, a.expires));
                            }
                            Event::Bid(b) => {
                                let (open, expires) = auctions[&b.auction];
                                assert!(
                                    open <= b.date_time && b.date_time <= expires,
                                    "rate {rate} seed {seed}: bid at {} on auction {} open {open}..={expires}",
                                    b.date_time,
                                    b.auction
                                );
                                assert!(b.bidder >= FIRST_ID && b.bidder < FIRST_ID + people);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nexmark_auctions_open_seconds_to_a_minute_at_default_rate() {
        let g = generator(5, 10_000_000);
        for e in events(&g, 0..10_000) {
            if let Event::Auction(a) = e {
                let open_ms = a.expires - a.date_time;
                assert!((MIN_OPEN_MS..=60_000).contains(&open_ms), "{open_ms}");
            }
        }
    }

    #[test]
    fn nexmark_hot_key_skew() {
        let g = generator(11, 10_000_000);
        let (mut bids, mut even_auction, mut bidder_mult4, mut auctions, mut seller_mult4) =
            (0f64, 0f64, 0f64, 0f64, 0f64);
        let mut price_decades = [0u32; 7];
        for e in events(&g, 0..500_000) {
            match e {
                Event::Bid(b) => {
                    bids += 1.0;
                    even_auction += f64::from(u8::from(b.auction % 2 == 0));
                    bidder_mult4 += f64::from(u8::from(b.bidder % 4 == 0));
                    assert!(b.price >= 100);
                    price_decades
                        [((b.price as f64).log10() - 2.0).floor().clamp(0.0, 6.0) as usize] += 1;
                }
                Event::Auction(a) => {
                    auctions += 1.0;
                    seller_mult4 += f64::from(u8::from(a.seller % 4 == 0));
                }
                Event::Person(_) => {}
            }
        }
        // Hot with prob. h, else uniform: P(multiple of m) = h + (1-h)/m.
        let near = |x: f64, want: f64| (x - want).abs() < 0.02;
        assert!(
            near(even_auction / bids, 0.5 + 0.5 / 2.0),
            "{}",
            even_auction / bids
        );
        assert!(
            near(bidder_mult4 / bids, 0.75 + 0.25 / 4.0),
            "{}",
            bidder_mult4 / bids
        );
        assert!(
            near(seller_mult4 / auctions, 0.75 + 0.25 / 4.0),
            "{}",
            seller_mult4 / auctions
        );
        for decade in &price_decades[..6] {
            let share = f64::from(*decade) / bids;
            assert!((share - 1.0 / 6.0).abs() < 0.01, "{price_decades:?}");
        }
    }

    #[test]
    fn nexmark_average_nominal_sizes() {
        let g = generator(13, 10_000_000);
        let mut sum = [0usize; 3];
        let mut count = [0usize; 3];
        for e in events(&g, 0..200_000) {
            let k = match e {
                Event::Person(_) => 0,
                Event::Auction(_) => 1,
                Event::Bid(_) => 2,
            };
            sum[k] += e.nominal_size_bytes();
            count[k] += 1;
        }
        for (k, target) in [200.0, 500.0, 100.0].into_iter().enumerate() {
            let avg = sum[k] as f64 / count[k] as f64;
            assert!(
                (avg - target).abs() < target * 0.1,
                "kind {k}: average {avg} vs {target}"
            );
        }
    }

    /// Nanoseconds this thread has run on a CPU (Linux), so that the speed printed
    /// is per core even when the machine is shared; `None` elsewhere.
    fn thread_cpu_ns() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    #[test]
    fn nexmark_generator_speed() {
        // Not an assertion: prints the speed (run with --release --nocapture), for a
        // cache-resident batch as a source would use and for a 1 Mi-event batch.
        let g = generator(17, 10_000_000);
        let total = if cfg!(debug_assertions) {
            1u64 << 21
        } else {
            1u64 << 25
        };
        for batch in [4096u64, 1 << 20] {
            let mut out = Vec::with_capacity(batch as usize);
            g.fill(0..batch, &mut out);
            let started = std::time::Instant::now();
            let cpu_started = thread_cpu_ns();
            let mut bytes = 0usize;
            for start in (0..total).step_by(batch as usize) {
                out.clear();
                g.fill(start..start + batch, &mut out);
                bytes += out.last().map_or(0, Event::nominal_size_bytes);
            }
            let wall_s = started.elapsed().as_secs_f64();
            let cpu_s = match (cpu_started, thread_cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 / 1e9,
                _ => wall_s,
            };
            println!(
                "nexmark generator, batches of {batch} events: {:.1} M events/s per \
                 CPU-second of this thread ({:.1} M events/s wall) [{bytes}]",
                total as f64 / cpu_s / 1e6,
                total as f64 / wall_s / 1e6,
            );
        }
    }
}

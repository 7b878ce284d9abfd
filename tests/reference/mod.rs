//! Plain reference implementation of the Nexmark queries of NEXMARK.md, for the
//! end-to-end tests: single-threaded, on a bounded input (so every window fires and
//! every auction closes), written to be obviously correct rather than fast, and kept
//! apart from any engine code. Also `assert_same_rows`, the comparison the contract
//! prescribes (multisets, floats within a relative 1e-9).
//!
//! Use from a root integration test with `mod reference;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dirigo_nexmark::{Auction, Bid, Event, Person};
use serde_json::{json, Value};

/// q4's closing-price rule, q5/q7/q8's window sizes and slide, in ms.
const TUMBLE_MS: i64 = 10_000;
const Q5_SIZE_MS: i64 = 10_000;
const Q5_SLIDE_MS: i64 = 2_000;
/// q1's euro conversion factor.
const EUROS_PER_DOLLAR: f64 = 0.908;

/// Rows of query `name` ("q0".."q8") over `events`, as JSON objects with the column
/// names of NEXMARK.md. Panics on an unknown query name.
pub fn query(name: &str, events: &[Event]) -> Vec<Value> {
    match name {
        "q0" => q0(events),
        "q1" => q1(events),
        "q2" => q2(events),
        "q3" => q3(events),
        "q4" => q4(events),
        "q5" => q5(events),
        "q7" => q7(events),
        "q8" => q8(events),
        other => panic!("reference: no query {other:?}"),
    }
}

/// Query names the reference implements.
pub const QUERIES: &[&str] = &["q0", "q1", "q2", "q3", "q4", "q5", "q7", "q8"];

fn bids(events: &[Event]) -> impl Iterator<Item = &Bid> {
    events.iter().filter_map(|e| match e {
        Event::Bid(b) => Some(b),
        _ => None,
    })
}

fn auctions(events: &[Event]) -> impl Iterator<Item = &Auction> {
    events.iter().filter_map(|e| match e {
        Event::Auction(a) => Some(&**a),
        _ => None,
    })
}

fn people(events: &[Event]) -> impl Iterator<Item = &Person> {
    events.iter().filter_map(|e| match e {
        Event::Person(p) => Some(&**p),
        _ => None,
    })
}

/// Start of the epoch-aligned tumbling window of `size_ms` that holds `t`.
fn tumble_start(t: i64, size_ms: i64) -> i64 {
    t.div_euclid(size_ms) * size_ms
}

pub fn q0(events: &[Event]) -> Vec<Value> {
    bids(events)
        .map(|b| {
            json!({
                "auction": b.auction,
                "bidder": b.bidder,
                "price": b.price,
                "channel": b.channel,
                "url": b.url,
                "date_time": b.date_time,
                "extra": b.extra,
            })
        })
        .collect()
}

pub fn q1(events: &[Event]) -> Vec<Value> {
    bids(events)
        .map(|b| {
            json!({
                "auction": b.auction,
                "bidder": b.bidder,
                "price": (b.price as f64) * EUROS_PER_DOLLAR,
                "date_time": b.date_time,
            })
        })
        .collect()
}

pub fn q2(events: &[Event]) -> Vec<Value> {
    bids(events)
        .filter(|b| b.auction % 123 == 0)
        .map(|b| json!({ "auction": b.auction, "price": b.price }))
        .collect()
}

/// Every (auction of category 10, its seller in OR, ID or CA) pair, whatever the
/// order in which the person and the auction appear in the input.
pub fn q3(events: &[Event]) -> Vec<Value> {
    let mut people_by_id: HashMap<u64, Vec<&Person>> = HashMap::new();
    for p in people(events) {
        people_by_id.entry(p.id).or_default().push(p);
    }
    let mut rows = Vec::new();
    for a in auctions(events).filter(|a| a.category == 10) {
        for p in people_by_id.get(&a.seller).into_iter().flatten() {
            if matches!(&*p.state, "OR" | "ID" | "CA") {
                rows.push(json!({
                    "name": p.name,
                    "city": p.city,
                    "state": p.state,
                    "id": a.id,
                }));
            }
        }
    }
    rows
}

/// Per category, the mean closing price over all auctions that have at least one bid
/// with `date_time <= bid.date_time <= expires` (closing price: the highest such bid).
/// Bids may come before or after their auction in the input.
pub fn q4(events: &[Event]) -> Vec<Value> {
    let mut bids_by_auction: HashMap<u64, Vec<&Bid>> = HashMap::new();
    for b in bids(events) {
        bids_by_auction.entry(b.auction).or_default().push(b);
    }
    let mut closing: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for a in auctions(events) {
        let best = bids_by_auction
            .get(&a.id)
            .into_iter()
            .flatten()
            .filter(|b| a.date_time <= b.date_time && b.date_time <= a.expires)
            .map(|b| b.price)
            .max();
        if let Some(price) = best {
            closing.entry(a.category).or_default().push(price);
        }
    }
    closing
        .into_iter()
        .map(|(category, prices)| {
            let sum: f64 = prices.iter().map(|&p| p as f64).sum();
            json!({ "category": category, "avg": sum / prices.len() as f64 })
        })
        .collect()
}

/// Sliding windows of 10 s every 2 s: per window, the auction(s) with the most bids.
pub fn q5(events: &[Event]) -> Vec<Value> {
    // window_start -> auction -> number of bids
    let mut counts: BTreeMap<i64, BTreeMap<u64, u64>> = BTreeMap::new();
    for b in bids(events) {
        let last_start = tumble_start(b.date_time, Q5_SLIDE_MS);
        let mut start = last_start;
        while start > b.date_time - Q5_SIZE_MS {
            *counts
                .entry(start)
                .or_default()
                .entry(b.auction)
                .or_default() += 1;
            start -= Q5_SLIDE_MS;
        }
    }
    let mut rows = Vec::new();
    for (start, per_auction) in counts {
        let max = per_auction.values().copied().max().unwrap_or(0);
        for (auction, num) in per_auction {
            if num == max {
                rows.push(json!({
                    "auction": auction,
                    "num": num,
                    "window_start": start,
                    "window_end": start + Q5_SIZE_MS,
                }));
            }
        }
    }
    rows
}

/// Tumbling windows of 10 s: per window, the bid(s) with the highest price.
pub fn q7(events: &[Event]) -> Vec<Value> {
    let mut windows: BTreeMap<i64, Vec<&Bid>> = BTreeMap::new();
    for b in bids(events) {
        windows
            .entry(tumble_start(b.date_time, TUMBLE_MS))
            .or_default()
            .push(b);
    }
    let mut rows = Vec::new();
    for (start, in_window) in windows {
        let max = in_window.iter().map(|b| b.price).max().unwrap_or(0);
        for b in in_window.into_iter().filter(|b| b.price == max) {
            rows.push(json!({
                "auction": b.auction,
                "price": b.price,
                "bidder": b.bidder,
                "date_time": b.date_time,
                "window_end": start + TUMBLE_MS,
            }));
        }
    }
    rows
}

/// Tumbling windows of 10 s: people who registered in a window and opened an auction
/// in the same window, one row per (person, window).
pub fn q8(events: &[Event]) -> Vec<Value> {
    let sellers: BTreeSet<(u64, i64)> = auctions(events)
        .map(|a| (a.seller, tumble_start(a.date_time, TUMBLE_MS)))
        .collect();
    let mut seen: BTreeSet<(u64, &str, i64)> = BTreeSet::new();
    let mut rows = Vec::new();
    for p in people(events) {
        let start = tumble_start(p.date_time, TUMBLE_MS);
        if sellers.contains(&(p.id, start)) && seen.insert((p.id, p.name.as_ref(), start)) {
            rows.push(json!({ "id": p.id, "name": p.name, "window_start": start }));
        }
    }
    rows
}

// ---------------------------------------------------------------------------
// Comparing results.

/// Relative tolerance for float columns (NEXMARK.md).
const FLOAT_TOLERANCE: f64 = 1e-9;

/// A row's identity with float values blanked out: rows can only match within the
/// same key, and then only if their floats are close.
fn key_and_floats(row: &Value) -> (String, Vec<f64>) {
    fn walk(v: &Value, key: &mut String, floats: &mut Vec<f64>) {
        match v {
            Value::Number(n) if n.is_f64() => {
                key.push('#');
                floats.push(n.as_f64().unwrap_or(f64::NAN));
            }
            Value::Object(map) => {
                let sorted: BTreeMap<&String, &Value> = map.iter().collect();
                key.push('{');
                for (k, v) in sorted {
                    key.push_str(&Value::String(k.clone()).to_string());
                    key.push(':');
                    walk(v, key, floats);
                    key.push(',');
                }
                key.push('}');
            }
            Value::Array(items) => {
                key.push('[');
                for v in items {
                    walk(v, key, floats);
                    key.push(',');
                }
                key.push(']');
            }
            other => key.push_str(&other.to_string()),
        }
    }
    let (mut key, mut floats) = (String::new(), Vec::new());
    walk(row, &mut key, &mut floats);
    (key, floats)
}

fn floats_close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(&x, &y)| x == y || (x - y).abs() <= FLOAT_TOLERANCE * x.abs().max(y.abs()))
}

/// Asserts that `actual` holds the same rows as `expected`, as multisets (order does
/// not matter, duplicates do), floats equal within a relative 1e-9. On a mismatch,
/// panics with the counts and a few missing and a few unexpected rows.
#[track_caller]
pub fn assert_same_rows(expected: &[Value], actual: &[Value]) {
    const SHOWN: usize = 5;
    // key -> floats of the actual rows with that key not matched yet
    let mut unmatched: HashMap<String, Vec<(Vec<f64>, &Value)>> = HashMap::new();
    for row in actual {
        let (key, floats) = key_and_floats(row);
        unmatched.entry(key).or_default().push((floats, row));
    }
    let mut missing = Vec::new();
    for row in expected {
        let (key, floats) = key_and_floats(row);
        let candidates = unmatched.get_mut(&key);
        let found = candidates.and_then(|c| {
            let i = c.iter().position(|(f, _)| floats_close(&floats, f))?;
            Some(c.swap_remove(i))
        });
        if found.is_none() {
            missing.push(row);
        }
    }
    let mut unexpected: Vec<&Value> = unmatched.into_values().flatten().map(|(_, r)| r).collect();
    if missing.is_empty() && unexpected.is_empty() {
        return;
    }
    unexpected.sort_by_key(|r| r.to_string());
    let mut message = format!(
        "results differ: {} rows expected, {} rows actual; {} expected rows missing, \
         {} actual rows unexpected",
        expected.len(),
        actual.len(),
        missing.len(),
        unexpected.len()
    );
    for (title, rows) in [("missing", &missing), ("unexpected", &unexpected)] {
        if !rows.is_empty() {
            message.push_str(&format!("\n{title} (first {}):", rows.len().min(SHOWN)));
            for row in rows.iter().take(SHOWN) {
                message.push_str(&format!("\n  {row}"));
            }
        }
    }
    panic!("{message}");
}

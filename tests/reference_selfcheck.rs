//! Checks the reference queries (tests/reference) on small hand-made inputs whose
//! results are written out by hand, so that the reference itself can be trusted when
//! the end-to-end tests compare the engine against it.

mod reference;

use std::borrow::Cow;

use dirigo_nexmark::{Auction, Bid, Event, Generator, GeneratorConfig, Person};
use reference::{assert_same_rows, query};
use serde_json::{json, Value};

/// A multiple of 10 s, so windows start here: W..W+10_000 is one tumbling window.
const W: i64 = 1_700_000_000_000;

fn person(id: u64, name: &'static str, state: &'static str, date_time: i64) -> Event {
    Event::Person(Box::new(Person {
        id,
        name: Cow::Borrowed(name),
        email_address: Cow::Borrowed("x@y.com"),
        credit_card: Cow::Borrowed("1234 5678 9012 3456"),
        city: Cow::Borrowed("Boise"),
        state: Cow::Borrowed(state),
        date_time,
        extra: Cow::Borrowed(""),
    }))
}

fn auction(id: u64, seller: u64, category: u64, date_time: i64, expires: i64) -> Event {
    Event::Auction(Box::new(Auction {
        id,
        item_name: Cow::Borrowed("item"),
        description: Cow::Borrowed("desc"),
        initial_bid: 1,
        reserve: 2,
        date_time,
        expires,
        seller,
        category,
        extra: Cow::Borrowed(""),
    }))
}

fn bid(auction: u64, bidder: u64, price: u64, date_time: i64) -> Event {
    Event::Bid(Bid {
        auction,
        bidder,
        price,
        channel: Cow::Borrowed("Apple"),
        url: Cow::Borrowed("https://www.nexmark.com/a/item.htm?query=1"),
        date_time,
        extra: Cow::Borrowed("pad"),
    })
}

fn check(name: &str, events: Vec<Event>, expected: Vec<Value>) {
    let actual = query(name, &events);
    assert_same_rows(&expected, &actual);
}

#[test]
fn q0_passes_every_bid_through() {
    check(
        "q0",
        vec![
            person(1, "P", "OR", W),
            bid(1000, 1, 7, W + 1),
            auction(1000, 1, 10, W, W + 5),
            bid(1001, 2, 8, W + 2),
        ],
        vec![
            json!({"auction": 1000, "bidder": 1, "price": 7, "channel": "Apple",
                   "url": "https://www.nexmark.com/a/item.htm?query=1", "date_time": W + 1, "extra": "pad"}),
            json!({"auction": 1001, "bidder": 2, "price": 8, "channel": "Apple",
                   "url": "https://www.nexmark.com/a/item.htm?query=1", "date_time": W + 2, "extra": "pad"}),
        ],
    );
    check("q0", vec![person(1, "P", "OR", W)], vec![]);
}

#[test]
fn q1_converts_prices_to_euros() {
    check(
        "q1",
        vec![bid(1, 2, 1000, W), bid(3, 4, 3, W + 1), bid(3, 4, 3, W + 1)],
        vec![
            json!({"auction": 1, "bidder": 2, "price": 908.0, "date_time": W}),
            json!({"auction": 3, "bidder": 4, "price": 2.724, "date_time": W + 1}),
            json!({"auction": 3, "bidder": 4, "price": 2.724, "date_time": W + 1}),
        ],
    );
}

#[test]
fn q2_selects_auctions_divisible_by_123() {
    check(
        "q2",
        vec![
            bid(123, 1, 5, W),
            bid(124, 1, 6, W),
            bid(246, 1, 7, W),
            bid(0, 1, 8, W),
            bid(122, 1, 9, W),
        ],
        vec![
            json!({"auction": 123, "price": 5}),
            json!({"auction": 246, "price": 7}),
            json!({"auction": 0, "price": 8}),
        ],
    );
}

#[test]
fn q3_joins_category_10_auctions_with_sellers_in_or_id_ca() {
    check(
        "q3",
        vec![
            person(1, "Ann", "OR", W),
            person(2, "Bob", "WA", W),
            auction(100, 1, 10, W + 1, W + 9), // Ann, OR, category 10: yes
            auction(101, 2, 10, W + 1, W + 9), // Bob is in WA: no
            auction(102, 1, 11, W + 1, W + 9), // category 11: no
            auction(103, 3, 10, W + 1, W + 9), // Cat arrives after her auction: yes
            auction(104, 4, 10, W + 1, W + 9), // Dan, two auctions: two rows
            auction(105, 4, 10, W + 2, W + 9),
            auction(106, 9, 10, W + 2, W + 9), // seller never registers: no
            person(3, "Cat", "CA", W + 5),
            person(4, "Dan", "ID", W + 6),
        ],
        vec![
            json!({"name": "Ann", "city": "Boise", "state": "OR", "id": 100}),
            json!({"name": "Cat", "city": "Boise", "state": "CA", "id": 103}),
            json!({"name": "Dan", "city": "Boise", "state": "ID", "id": 104}),
            json!({"name": "Dan", "city": "Boise", "state": "ID", "id": 105}),
        ],
    );
}

#[test]
fn q4_averages_closing_prices_within_date_time_and_expires() {
    check(
        "q4",
        vec![
            bid(103, 1, 7, W + 10), // before its auction in the input, inside its span
            auction(100, 1, 10, W, W + 100),
            bid(100, 1, 5, W + 50),
            bid(100, 2, 9, W + 100),   // exactly at expires: counts
            bid(100, 2, 100, W + 101), // after expires: ignored
            bid(100, 2, 200, W - 1),   // before date_time: ignored
            auction(101, 1, 10, W, W + 100),
            bid(101, 3, 3, W), // exactly at date_time: counts
            auction(102, 1, 11, W, W + 100),
            bid(102, 3, 50, W + 101), // only bid is late: no closing price, no row
            auction(103, 1, 12, W, W + 100),
            auction(104, 1, 12, W, W + 100), // no bids at all
            auction(105, 1, 13, W, W + 100),
            bid(105, 1, 1, W + 1),
            bid(105, 1, 2, W + 2),
            auction(106, 1, 13, W, W + 100),
            bid(106, 1, 4, W + 3),
        ],
        vec![
            json!({"category": 10, "avg": 6.0}), // (9 + 3) / 2
            json!({"category": 12, "avg": 7.0}),
            json!({"category": 13, "avg": 3.0}), // (2 + 4) / 2
        ],
    );
}

#[test]
fn q5_reports_all_tied_hottest_auctions_per_sliding_window() {
    let row = |auction: u64, num: u64, start: i64, end: i64| json!({"auction": auction, "num": num, "window_start": start, "window_end": end});
    check(
        "q5",
        vec![
            bid(1, 9, 1, W),
            bid(2, 9, 1, W + 1_000),
            bid(2, 9, 1, W + 9_999),
            bid(1, 9, 1, W + 10_000), // not in [W, W+10000)
        ],
        vec![
            // W and W+1000 are in the windows starting W-8000 ..= W: 1 bid each, a tie.
            row(1, 1, W - 8_000, W + 2_000),
            row(2, 1, W - 8_000, W + 2_000),
            row(1, 1, W - 6_000, W + 4_000),
            row(2, 1, W - 6_000, W + 4_000),
            row(1, 1, W - 4_000, W + 6_000),
            row(2, 1, W - 4_000, W + 6_000),
            row(1, 1, W - 2_000, W + 8_000),
            row(2, 1, W - 2_000, W + 8_000),
            // [W, W+10000): auction 2 twice, auction 1 once.
            row(2, 2, W, W + 10_000),
            // W+9999 and W+10000 share the windows starting W+2000 ..= W+8000.
            row(1, 1, W + 2_000, W + 12_000),
            row(2, 1, W + 2_000, W + 12_000),
            row(1, 1, W + 4_000, W + 14_000),
            row(2, 1, W + 4_000, W + 14_000),
            row(1, 1, W + 6_000, W + 16_000),
            row(2, 1, W + 6_000, W + 16_000),
            row(1, 1, W + 8_000, W + 18_000),
            row(2, 1, W + 8_000, W + 18_000),
            row(1, 1, W + 10_000, W + 20_000),
        ],
    );
}

#[test]
fn q7_reports_all_tied_highest_bids_per_tumbling_window() {
    let row = |auction: u64, price: u64, bidder: u64, date_time: i64, end: i64| json!({"auction": auction, "price": price, "bidder": bidder, "date_time": date_time, "window_end": end});
    check(
        "q7",
        vec![
            bid(1, 10, 5, W + 1),
            bid(1, 10, 9, W + 2),
            bid(2, 11, 9, W + 9_999),
            bid(3, 12, 100, W + 10_000), // next window
            bid(4, 13, 1, W - 1),        // previous window
            bid(5, 14, 4, -5),           // before the epoch: window [-10000, 0)
        ],
        vec![
            row(1, 9, 10, W + 2, W + 10_000),
            row(2, 9, 11, W + 9_999, W + 10_000),
            row(3, 100, 12, W + 10_000, W + 20_000),
            row(4, 1, 13, W - 1, W),
            row(5, 4, 14, -5, 0),
        ],
    );
}

#[test]
fn q8_reports_new_people_who_sold_in_the_same_window() {
    check(
        "q8",
        vec![
            person(1, "Ann", "OR", W + 5),
            auction(100, 1, 10, W + 9_999, W + 20_000), // same window: row
            person(2, "Bob", "WA", W + 9_999),
            auction(101, 2, 10, W + 10_000, W + 20_000), // next window: no row
            person(3, "Cat", "CA", W + 100),
            auction(102, 3, 10, W + 200, W + 20_000), // two auctions, one row
            auction(103, 3, 10, W + 300, W + 20_000),
            auction(104, 4, 10, W + 10_001, W + 20_000), // Dan registered a window earlier
            person(4, "Dan", "ID", W + 9_000),
            auction(105, 5, 10, W + 1, W + 20_000), // Eve registers after, same window
            person(5, "Eve", "OR", W + 2),
        ],
        vec![
            json!({"id": 1, "name": "Ann", "window_start": W}),
            json!({"id": 3, "name": "Cat", "window_start": W}),
            json!({"id": 5, "name": "Eve", "window_start": W}),
        ],
    );
}

fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let err = std::panic::catch_unwind(f).expect_err("expected a mismatch");
    err.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn assert_same_rows_compares_multisets_with_float_tolerance() {
    let a = json!({"k": 1, "avg": 1.0 / 3.0});
    let b = json!({"k": 2, "avg": 5.0});
    assert_same_rows(
        &[a.clone(), b.clone(), b.clone()],
        &[b.clone(), a.clone(), b.clone()],
    );
    assert_same_rows(&[json!({"avg": 1e12})], &[json!({"avg": 1e12 + 1e2})]); // 1e-10 relative

    let message =
        panic_message(|| assert_same_rows(&[json!({"avg": 1.0})], &[json!({"avg": 1.0 + 1e-8})]));
    assert!(message.contains("1 expected rows missing"), "{message}");

    let message = panic_message(|| {
        assert_same_rows(
            &[json!({"k": 1}), json!({"k": 1}), json!({"k": 2})],
            &[
                json!({"k": 1}),
                json!({"k": 3}),
                json!({"k": 2, "extra": 0}),
            ],
        )
    });
    assert!(
        message.contains("3 rows expected, 3 rows actual"),
        "{message}"
    );
    assert!(
        message.contains("missing (first 2):\n  {\"k\":1}\n  {\"k\":2}"),
        "{message}"
    );
    assert!(message.contains("unexpected (first 2):"), "{message}");
    assert!(message.contains("{\"k\":3}"), "{message}");
}

#[test]
fn reference_runs_on_generated_events() {
    let g = Generator::new(GeneratorConfig {
        rate: dirigo_engine::dataflow::RateSchedule::constant(10_000),
        ..GeneratorConfig::default()
    })
    .expect("valid config");
    let mut events = Vec::new();
    g.fill(0..200_000, &mut events);
    let bids = events.iter().filter(|e| matches!(e, Event::Bid(_))).count();
    for name in reference::QUERIES {
        let rows = query(name, &events);
        match *name {
            "q0" | "q1" => assert_eq!(rows.len(), bids),
            _ => assert!(
                !rows.is_empty(),
                "{name} produced nothing on 20 s of events"
            ),
        }
    }
    // Every generated auction with bids closes with one of them: 5 categories.
    assert_eq!(query("q4", &events).len(), 5);
}

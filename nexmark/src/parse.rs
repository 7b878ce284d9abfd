//! The fast path from one JSON line to an [`Event`]: a SIMD JSON parser
//! (sonic-rs, chosen by measurement, see ARCHITECTURE.md) fills one flat struct
//! whose strings borrow from the line, then [`Flat::into_event`] checks which
//! fields belong to which kind and builds the `Event`.
//!
//! Why flat: an internally tagged enum makes serde buffer every field into a
//! temporary tree before it knows the variant; one struct with every field
//! optional is filled in one pass whatever the key order. Why borrowed: a string
//! is copied once, into the event, or not at all when the [`Interner`] already
//! holds it (channel, url, city, state: few distinct values, one per bid).
//!
//! Strings of an `Event` are [`Text`] (`Cow<'static, str>`): an interned string
//! is a `&'static str` from a bounded, process-wide pool (a leak bounded by
//! [`INTERN_STRINGS_MAX`] x [`INTERN_STRING_BYTES_MAX`], 2 MiB), everything else
//! is an owned copy. No record borrows from a read buffer, which is recycled.

use std::borrow::Cow;
use std::collections::HashSet;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use dirigo_engine::ids::IdBuildHasher;
use serde::Deserialize;

use crate::event::{Auction, Bid, Event, Person, Text};

/// Strings the process-wide intern pool holds at most (every partition of every
/// job shares it; past this, strings are copied per event).
pub const INTERN_STRINGS_MAX: usize = 16_384;
/// Longer strings are never interned.
pub const INTERN_STRING_BYTES_MAX: usize = 128;
/// Event times must lie within ±2^53 ms (about 285,000 years around 1970): exact
/// as an f64, and far enough from `i64::MAX` (the end-of-input watermark) that no
/// window arithmetic on them can overflow.
pub const TIME_ABS_MAX_MS: i64 = 1 << 53;

/// One event line, every field optional, strings borrowed from the line where
/// they have no escapes.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Flat<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Str<'a>>,
    pub id: Option<u64>,
    #[serde(borrow)]
    pub name: Option<Str<'a>>,
    #[serde(borrow)]
    pub email_address: Option<Str<'a>>,
    #[serde(borrow)]
    pub credit_card: Option<Str<'a>>,
    #[serde(borrow)]
    pub city: Option<Str<'a>>,
    #[serde(borrow)]
    pub state: Option<Str<'a>>,
    pub date_time: Option<i64>,
    #[serde(borrow)]
    pub extra: Option<Str<'a>>,
    #[serde(borrow)]
    pub item_name: Option<Str<'a>>,
    #[serde(borrow)]
    pub description: Option<Str<'a>>,
    pub initial_bid: Option<u64>,
    pub reserve: Option<u64>,
    pub expires: Option<i64>,
    pub seller: Option<u64>,
    pub category: Option<u64>,
    pub auction: Option<u64>,
    pub bidder: Option<u64>,
    pub price: Option<u64>,
    #[serde(borrow)]
    pub channel: Option<Str<'a>>,
    #[serde(borrow)]
    pub url: Option<Str<'a>>,
}

/// A string field: borrowed from the line unless it had escapes. (serde borrows
/// a bare `Cow<str>` field but not an `Option<Cow<str>>`, hence this wrapper.)
pub struct Str<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Parses one line (without its line end) into the flat struct with sonic-rs.
pub fn parse_flat(line: &[u8]) -> Result<Flat<'_>, String> {
    sonic_rs::from_slice(line).map_err(|e| {
        // sonic-rs appends " at line 1 column C" and a snippet of the line on
        // lines of their own; the caller names the line, so keep the column.
        let full = e.to_string();
        let first_line = full.lines().next().unwrap_or(&full);
        let message = first_line
            .rsplit_once(" at line ")
            .map_or(first_line, |(head, _)| head);
        format!("{message} (column {})", e.column())
    })
}

/// Builds [`Text`]s: interned `&'static str` for the low-cardinality fields
/// (bounded, see [`INTERN_STRINGS_MAX`]), owned copies otherwise.
///
/// Each partition keeps its own lock-free cache in front of the shared pool, so
/// the pool's mutex is taken only on a partition's first sight of a string.
#[derive(Default)]
pub struct Interner {
    local: HashSet<&'static str, IdBuildHasher>,
}

static POOL: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
/// Set once the pool is full: from then on a miss copies the string without
/// taking the pool's lock (no lock per record, however varied the input).
static POOL_FULL: AtomicBool = AtomicBool::new(false);

impl Interner {
    /// A `Text` for `s`, interned if it is short and there is room.
    pub fn intern(&mut self, s: Option<Str<'_>>, name: &'static str) -> Result<Text, String> {
        let s = need(s, name)?.0;
        if let Some(found) = self.local.get(&*s) {
            return Ok(Cow::Borrowed(found));
        }
        if s.len() > INTERN_STRING_BYTES_MAX
            || self.local.len() >= INTERN_STRINGS_MAX
            || POOL_FULL.load(Ordering::Relaxed)
        {
            return Ok(Cow::Owned(s.into_owned()));
        }
        Ok(match intern_shared(&s) {
            Some(shared) => {
                self.local.insert(shared);
                Cow::Borrowed(shared)
            }
            None => Cow::Owned(s.into_owned()),
        })
    }
}

/// Looks `s` up in the process-wide pool, adding it if there is room.
fn intern_shared(s: &str) -> Option<&'static str> {
    // A poisoned pool only means another thread panicked mid-insert of a
    // complete &'static str; the set is still consistent.
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = guard.get_or_insert_with(HashSet::new);
    if let Some(found) = pool.get(s) {
        return Some(found);
    }
    if pool.len() >= INTERN_STRINGS_MAX {
        POOL_FULL.store(true, Ordering::Relaxed);
        return None;
    }
    // The one deliberate leak: bounded by INTERN_STRINGS_MAX strings of at most
    // INTERN_STRING_BYTES_MAX bytes for the life of the process.
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    pool.insert(leaked);
    Some(leaked)
}

fn owned(s: Option<Str<'_>>, name: &'static str) -> Result<Text, String> {
    match s {
        Some(s) => Ok(Cow::Owned(s.0.into_owned())),
        None => Err(format!("missing field `{name}`")),
    }
}

fn need<T>(v: Option<T>, name: &'static str) -> Result<T, String> {
    v.ok_or_else(|| format!("missing field `{name}`"))
}

fn time(v: Option<i64>, name: &'static str) -> Result<i64, String> {
    let t = need(v, name)?;
    if t.unsigned_abs() > TIME_ABS_MAX_MS as u64 {
        return Err(format!(
            "{name} {t} is out of range (|t| <= 2^53 ms, about 285,000 years around 1970)"
        ));
    }
    Ok(t)
}

const BID_FIELDS: &[&str] = &[
    "auction",
    "bidder",
    "price",
    "channel",
    "url",
    "date_time",
    "extra",
];
const PERSON_FIELDS: &[&str] = &[
    "id",
    "name",
    "email_address",
    "credit_card",
    "city",
    "state",
    "date_time",
    "extra",
];
const AUCTION_FIELDS: &[&str] = &[
    "id",
    "item_name",
    "description",
    "initial_bid",
    "reserve",
    "date_time",
    "expires",
    "seller",
    "category",
    "extra",
];

impl Flat<'_> {
    /// Every field but `type`, whether the line had it, in the struct's order.
    fn present(&self) -> [(bool, &'static str); 20] {
        [
            (self.id.is_some(), "id"),
            (self.name.is_some(), "name"),
            (self.email_address.is_some(), "email_address"),
            (self.credit_card.is_some(), "credit_card"),
            (self.city.is_some(), "city"),
            (self.state.is_some(), "state"),
            (self.date_time.is_some(), "date_time"),
            (self.extra.is_some(), "extra"),
            (self.item_name.is_some(), "item_name"),
            (self.description.is_some(), "description"),
            (self.initial_bid.is_some(), "initial_bid"),
            (self.reserve.is_some(), "reserve"),
            (self.expires.is_some(), "expires"),
            (self.seller.is_some(), "seller"),
            (self.category.is_some(), "category"),
            (self.auction.is_some(), "auction"),
            (self.bidder.is_some(), "bidder"),
            (self.price.is_some(), "price"),
            (self.channel.is_some(), "channel"),
            (self.url.is_some(), "url"),
        ]
    }

    /// The first field present that `kind`'s `fields` do not have, as an error.
    fn reject_foreign(&self, fields: &[&str], kind: &str) -> Result<(), String> {
        let foreign = self
            .present()
            .into_iter()
            .find(|(present, name)| *present && !fields.contains(name));
        match foreign {
            Some((_, name)) => Err(format!("field `{name}` does not belong to a {kind}")),
            None => Ok(()),
        }
    }

    /// The event these fields make, or what is wrong with them.
    pub fn into_event(mut self, interner: &mut Interner) -> Result<Event, String> {
        let kind = need(self.kind.take(), "type")?;
        match &*kind.0 {
            "bid" => {
                self.reject_foreign(BID_FIELDS, "bid")?;
                Ok(Event::Bid(Bid {
                    auction: need(self.auction, "auction")?,
                    bidder: need(self.bidder, "bidder")?,
                    price: need(self.price, "price")?,
                    channel: interner.intern(self.channel, "channel")?,
                    url: interner.intern(self.url, "url")?,
                    date_time: time(self.date_time, "date_time")?,
                    extra: owned(self.extra, "extra")?,
                }))
            }
            "person" => {
                self.reject_foreign(PERSON_FIELDS, "person")?;
                Ok(Event::Person(Box::new(Person {
                    id: need(self.id, "id")?,
                    name: owned(self.name, "name")?,
                    email_address: owned(self.email_address, "email_address")?,
                    credit_card: owned(self.credit_card, "credit_card")?,
                    city: interner.intern(self.city, "city")?,
                    state: interner.intern(self.state, "state")?,
                    date_time: time(self.date_time, "date_time")?,
                    extra: owned(self.extra, "extra")?,
                })))
            }
            "auction" => {
                self.reject_foreign(AUCTION_FIELDS, "auction")?;
                Ok(Event::Auction(Box::new(Auction {
                    id: need(self.id, "id")?,
                    item_name: owned(self.item_name, "item_name")?,
                    description: owned(self.description, "description")?,
                    initial_bid: need(self.initial_bid, "initial_bid")?,
                    reserve: need(self.reserve, "reserve")?,
                    date_time: time(self.date_time, "date_time")?,
                    expires: time(self.expires, "expires")?,
                    seller: need(self.seller, "seller")?,
                    category: need(self.category, "category")?,
                    extra: owned(self.extra, "extra")?,
                })))
            }
            other => Err(format!(
                "unknown type `{other}`, expected one of `person`, `auction`, `bid`"
            )),
        }
    }
}

/// Parses one line (without its line end) into an event: the canonical layout
/// by [`canonical`], anything else (another key order, whitespace, escapes, an
/// error) by sonic-rs.
#[inline]
pub fn parse_event(interner: &mut Interner, line: &[u8]) -> Result<Event, String> {
    if let Some(event) = canonical::parse(interner, line) {
        return event;
    }
    parse_flat(line)?.into_event(interner)
}

/// The canonical layout: each kind's fields in NEXMARK.md's order, no whitespace,
/// strings without escapes or control characters, numbers without sign (but for
/// times), leading zeros or fraction; exactly what `dirigo gen` writes. A line in
/// it is read by a cursor that checks every byte against the layout and builds
/// the event in one pass; at the first byte that does not fit it gives up
/// (`None`) and the line is parsed again by sonic-rs, so what it accepts is the
/// same as the general path and every error message comes from there. Values are
/// checked the same way (`time`'s range, the interner), through the same helpers.
///
/// Why: the general path's serde visitor costs about 2x the scan itself (a
/// match on every key, an `Option` per field); most input is in this layout.
mod canonical {
    use std::borrow::Cow;

    use super::{time, Interner, Str};
    use crate::event::{Auction, Bid, Event, Person, Text};

    struct Cursor<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Cursor<'a> {
        #[inline]
        fn literal(&mut self, expected: &[u8]) -> Option<()> {
            let end = self.at + expected.len();
            (self.bytes.get(self.at..end)? == expected).then(|| self.at = end)
        }

        /// A JSON number that is a `u64`: digits, no leading zero (but `0`).
        #[inline]
        fn u64(&mut self) -> Option<u64> {
            let start = self.at;
            let mut value: u64 = 0;
            while let Some(&b) = self.bytes.get(self.at) {
                if !b.is_ascii_digit() {
                    break;
                }
                value = value.checked_mul(10)?.checked_add((b - b'0') as u64)?;
                self.at += 1;
            }
            let digits = self.at - start;
            let leading_zero = digits > 1 && self.bytes[start] == b'0';
            (digits > 0 && !leading_zero).then_some(value)
        }

        /// A JSON number that is an `i64`.
        #[inline]
        fn i64(&mut self) -> Option<i64> {
            if self.bytes.get(self.at) == Some(&b'-') {
                self.at += 1;
                // `-0` is a float to sonic-rs (refused as an i64): leave it to it.
                let magnitude = self.u64().filter(|&m| m > 0)?;
                return 0i64.checked_sub_unsigned(magnitude);
            }
            i64::try_from(self.u64()?).ok()
        }

        /// The rest of a string whose opening quote was read: up to the closing
        /// quote, with no escape and no control character in it.
        #[inline]
        fn string(&mut self) -> Option<&'a str> {
            let rest = &self.bytes[self.at..];
            let end = memchr::memchr(b'"', rest)?;
            let text = &rest[..end];
            // One branch-free pass (vectorized): an escape, a control character,
            // or a byte outside ASCII.
            let flags = text.iter().fold(0u8, |flags, &b| {
                flags | (b == b'\\') as u8 | ((b < 0x20) as u8) << 1 | ((b >= 0x80) as u8) << 2
            });
            let text = match flags {
                // SAFETY: every byte is below 0x80, and ASCII is valid UTF-8.
                0 => unsafe { std::str::from_utf8_unchecked(text) },
                4 => std::str::from_utf8(text).ok()?,
                _ => return None,
            };
            self.at += end + 1;
            Some(text)
        }

        #[inline]
        fn end(&self) -> Option<()> {
            (self.at == self.bytes.len()).then_some(())
        }
    }

    /// `Some(Ok(event))` for a valid line in the layout, `Some(Err)` for one in
    /// the layout whose values are refused (a time out of range), `None` for
    /// anything else.
    #[inline]
    pub(super) fn parse(interner: &mut Interner, line: &[u8]) -> Option<Result<Event, String>> {
        let mut c = Cursor { bytes: line, at: 0 };
        c.literal(br#"{"type":""#)?;
        match line.get(c.at)? {
            b'b' => bid(&mut c, interner),
            b'p' => person(&mut c, interner),
            b'a' => auction(&mut c, interner),
            _ => None,
        }
    }

    fn interned(interner: &mut Interner, s: &str, name: &'static str) -> Result<Text, String> {
        interner.intern(Some(Str(Cow::Borrowed(s))), name)
    }

    fn owned(s: &str) -> Text {
        Cow::Owned(s.to_owned())
    }

    #[inline]
    fn bid(c: &mut Cursor<'_>, interner: &mut Interner) -> Option<Result<Event, String>> {
        c.literal(br#"bid","auction":"#)?;
        let auction = c.u64()?;
        c.literal(br#","bidder":"#)?;
        let bidder = c.u64()?;
        c.literal(br#","price":"#)?;
        let price = c.u64()?;
        c.literal(br#","channel":""#)?;
        let channel = c.string()?;
        c.literal(br#","url":""#)?;
        let url = c.string()?;
        c.literal(br#","date_time":"#)?;
        let date_time = c.i64()?;
        c.literal(br#","extra":""#)?;
        let extra = c.string()?;
        c.literal(b"}")?;
        c.end()?;
        Some((|| {
            Ok(Event::Bid(Bid {
                auction,
                bidder,
                price,
                channel: interned(interner, channel, "channel")?,
                url: interned(interner, url, "url")?,
                date_time: time(Some(date_time), "date_time")?,
                extra: owned(extra),
            }))
        })())
    }

    fn person(c: &mut Cursor<'_>, interner: &mut Interner) -> Option<Result<Event, String>> {
        c.literal(br#"person","id":"#)?;
        let id = c.u64()?;
        c.literal(br#","name":""#)?;
        let name = c.string()?;
        c.literal(br#","email_address":""#)?;
        let email_address = c.string()?;
        c.literal(br#","credit_card":""#)?;
        let credit_card = c.string()?;
        c.literal(br#","city":""#)?;
        let city = c.string()?;
        c.literal(br#","state":""#)?;
        let state = c.string()?;
        c.literal(br#","date_time":"#)?;
        let date_time = c.i64()?;
        c.literal(br#","extra":""#)?;
        let extra = c.string()?;
        c.literal(b"}")?;
        c.end()?;
        Some((|| {
            Ok(Event::Person(Box::new(Person {
                id,
                name: owned(name),
                email_address: owned(email_address),
                credit_card: owned(credit_card),
                city: interned(interner, city, "city")?,
                state: interned(interner, state, "state")?,
                date_time: time(Some(date_time), "date_time")?,
                extra: owned(extra),
            })))
        })())
    }

    fn auction(c: &mut Cursor<'_>, _interner: &mut Interner) -> Option<Result<Event, String>> {
        c.literal(br#"auction","id":"#)?;
        let id = c.u64()?;
        c.literal(br#","item_name":""#)?;
        let item_name = c.string()?;
        c.literal(br#","description":""#)?;
        let description = c.string()?;
        c.literal(br#","initial_bid":"#)?;
        let initial_bid = c.u64()?;
        c.literal(br#","reserve":"#)?;
        let reserve = c.u64()?;
        c.literal(br#","date_time":"#)?;
        let date_time = c.i64()?;
        c.literal(br#","expires":"#)?;
        let expires = c.i64()?;
        c.literal(br#","seller":"#)?;
        let seller = c.u64()?;
        c.literal(br#","category":"#)?;
        let category = c.u64()?;
        c.literal(br#","extra":""#)?;
        let extra = c.string()?;
        c.literal(b"}")?;
        c.end()?;
        Some((|| {
            Ok(Event::Auction(Box::new(Auction {
                id,
                item_name: owned(item_name),
                description: owned(description),
                initial_bid,
                reserve,
                date_time: time(Some(date_time), "date_time")?,
                expires: time(Some(expires), "expires")?,
                seller,
                category,
                extra: owned(extra),
            })))
        })())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{Generator, GeneratorConfig};
    use crate::json::write_json_line;

    fn parse(line: &str) -> Result<Event, String> {
        parse_event(&mut Interner::default(), line.as_bytes())
    }

    #[test]
    fn fast_parse_matches_serde_json_on_generated_events() {
        let g = Generator::new(GeneratorConfig::default()).unwrap();
        let mut events = Vec::new();
        g.fill(0..5_000, &mut events);
        let mut interner = Interner::default();
        for e in &events {
            let mut line = Vec::new();
            write_json_line(e, &mut line);
            line.pop();
            let parsed = parse_event(&mut interner, &line).unwrap();
            assert_eq!(&parsed, e);
        }
    }

    /// The canonical path accepts exactly what the general path accepts, with
    /// the same events and errors: generated lines, and each of them mutated at a
    /// random byte (a digit, a quote, a backslash, a space, a control character,
    /// a non-ASCII byte, truncation).
    #[test]
    fn the_canonical_layout_path_agrees_with_the_general_path() {
        let g = Generator::new(GeneratorConfig::default()).unwrap();
        let mut events = Vec::new();
        g.fill(0..3_000, &mut events);
        let mut general = Interner::default();
        let mut either = Interner::default();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut canonical_hits = 0;
        let replacements: &[&[u8]] = &[
            b"7", b"\"", b"\\", b" ", b"\x01", b"\xc3", b"-", b"0", b"-0", b"",
        ];
        for e in &events {
            let mut line = Vec::new();
            write_json_line(e, &mut line);
            line.pop();
            let mut cases = vec![line.clone()];
            for replacement in replacements {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = (rng % line.len() as u64) as usize;
                let mut mutated = line[..at].to_vec();
                mutated.extend_from_slice(replacement);
                mutated.extend_from_slice(&line[at + 1..]);
                cases.push(mutated);
            }
            cases.push(line[..line.len() / 2].to_vec());
            for case in cases {
                canonical_hits +=
                    canonical::parse(&mut Interner::default(), &case).is_some() as u32;
                let expected = parse_flat(&case).and_then(|f| f.into_event(&mut general));
                let got = parse_event(&mut either, &case);
                assert_eq!(got, expected, "{}", String::from_utf8_lossy(&case));
            }
        }
        assert!(
            canonical_hits >= 3_000,
            "the layout path took {canonical_hits} lines"
        );
    }

    #[test]
    fn fast_parse_errors_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (r#"{"type":"bid","auction":1000,"bidder":10"#, ""),
            (r#"{"type":"sale","auction":1000}"#, "unknown type `sale`"),
            (
                r#"{"type":"bid","auction":1000,"bidder":1001,"channel":"Apple","url":"u","date_time":1,"extra":""}"#,
                "missing field `price`",
            ),
            (r#"{"auction":1000}"#, "missing field `type`"),
            (r#"{"type":"bid","colour":"red"}"#, "unknown field `colour`"),
            (
                r#"{"type":"bid","auction":1000,"bidder":1001,"price":1,"channel":"c","url":"u","date_time":0,"extra":"","seller":5}"#,
                "field `seller` does not belong to a bid",
            ),
            (
                r#"{"type":"bid","auction":1000,"bidder":1001,"price":1,"channel":"c","url":"u","date_time":9223372036854775807,"extra":""}"#,
                "date_time 9223372036854775807 is out of range",
            ),
            (
                r#"{"type":"bid","auction":1000,"bidder":1001,"price":"5","channel":"c","url":"u","date_time":0,"extra":""}"#,
                "",
            ),
            (r#"[1,2]"#, ""),
            (
                r#"{"type":"bid","auction":1000,"bidder":1001,"price":1,"channel":"c","url":"u","date_time":-0,"extra":""}"#,
                "expected i64",
            ),
            (r#"{"type":"bid","auction":"x"}"#, "expected u64 (column "),
        ];
        for (line, want) in cases {
            let err = parse(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
            assert!(
                !err.contains('\n') && !err.contains(" at line "),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn fast_parse_unescapes_and_interns() {
        let line = r#"{"type":"bid","auction":1000,"bidder":1001,"price":5,"channel":"A\"pple\u00e9","url":"u","date_time":-1,"extra":"x"}"#;
        match parse(line).unwrap() {
            Event::Bid(b) => {
                assert_eq!(b.channel, "A\"pple\u{e9}");
                assert!(matches!(b.channel, Cow::Borrowed(_)), "interned");
                assert!(matches!(b.extra, Cow::Owned(_)));
            }
            other => panic!("{other:?}"),
        }
    }
}

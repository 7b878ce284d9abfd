//! The three Nexmark event kinds (person, auction, bid) with exactly the fields of
//! NEXMARK.md, and their JSON form: one object with `"type"` plus those fields.
//!
//! Strings are [`Text`] (`Cow<'static, str>`) so that the generator can hand out
//! borrowed slices of static pools without allocating, while parsed events own their
//! strings. Events are written with serde; they are read by `parse` (one parser
//! for the file source and the JSON Lines reader alike).

use std::borrow::Cow;

use serde::Serialize;

/// A string field: borrowed from a static pool when generated, owned when parsed.
pub type Text = Cow<'static, str>;

/// Bytes a numeric field counts for in the nominal size of an event.
const NOMINAL_NUMERIC_BYTES: usize = 8;

/// A person registering. `date_time` is in milliseconds since the Unix epoch.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Person {
    pub id: u64,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub name: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub email_address: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub credit_card: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub city: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub state: Text,
    pub date_time: i64,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub extra: Text,
}

/// An auction opening. `date_time` and `expires` are in milliseconds since the epoch.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Auction {
    pub id: u64,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub item_name: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub description: Text,
    pub initial_bid: u64,
    pub reserve: u64,
    pub date_time: i64,
    pub expires: i64,
    pub seller: u64,
    pub category: u64,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub extra: Text,
}

/// A bid on an auction. `date_time` is in milliseconds since the epoch.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Bid {
    pub auction: u64,
    pub bidder: u64,
    pub price: u64,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub channel: Text,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub url: Text,
    pub date_time: i64,
    #[rkyv(with = rkyv::with::AsOwned)]
    pub extra: Text,
}

/// One Nexmark event. Serializes as `{"type":"person"|"auction"|"bid", ...fields}`.
///
/// Persons and auctions are boxed: they are 4 in 50 events but up to 1.5 times a bid's
/// size, and every event of a batch is moved a few times on its way through a
/// query, so a bid-sized `Event` (112 bytes, not 160) saves a third of that copying.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    Person(Box<Person>),
    Auction(Box<Auction>),
    Bid(Bid),
}

impl Person {
    /// Nominal size in bytes: 8 per numeric field plus the lengths of the strings.
    pub fn nominal_size_bytes(&self) -> usize {
        2 * NOMINAL_NUMERIC_BYTES
            + self.name.len()
            + self.email_address.len()
            + self.credit_card.len()
            + self.city.len()
            + self.state.len()
            + self.extra.len()
    }
}

impl Auction {
    /// Nominal size in bytes: 8 per numeric field plus the lengths of the strings.
    pub fn nominal_size_bytes(&self) -> usize {
        7 * NOMINAL_NUMERIC_BYTES + self.item_name.len() + self.description.len() + self.extra.len()
    }
}

impl Bid {
    /// Nominal size in bytes: 8 per numeric field plus the lengths of the strings.
    pub fn nominal_size_bytes(&self) -> usize {
        4 * NOMINAL_NUMERIC_BYTES + self.channel.len() + self.url.len() + self.extra.len()
    }
}

impl Event {
    /// Event time, in milliseconds since the Unix epoch.
    pub fn date_time(&self) -> i64 {
        match self {
            Event::Person(p) => p.date_time,
            Event::Auction(a) => a.date_time,
            Event::Bid(b) => b.date_time,
        }
    }

    /// Nominal size in bytes (see NEXMARK.md): 8 per numeric field plus string lengths.
    pub fn nominal_size_bytes(&self) -> usize {
        match self {
            Event::Person(p) => p.nominal_size_bytes(),
            Event::Auction(a) => a.nominal_size_bytes(),
            Event::Bid(b) => b.nominal_size_bytes(),
        }
    }

    /// `"person"`, `"auction"` or `"bid"`, as in the JSON `"type"` field.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Event::Person(_) => "person",
            Event::Auction(_) => "auction",
            Event::Bid(_) => "bid",
        }
    }
}

impl From<Person> for Event {
    fn from(p: Person) -> Self {
        Event::Person(Box::new(p))
    }
}

impl From<Auction> for Event {
    fn from(a: Auction) -> Self {
        Event::Auction(Box::new(a))
    }
}

impl From<Bid> for Event {
    fn from(b: Bid) -> Self {
        Event::Bid(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bid() -> Bid {
        Bid {
            auction: 1000,
            bidder: 1001,
            price: 123,
            channel: Cow::Borrowed("Google"),
            url: Cow::Borrowed("https://www.nexmark.com/x/item.htm"),
            date_time: 1_700_000_001_234,
            extra: Cow::Borrowed(""),
        }
    }

    #[test]
    fn nexmark_event_json_is_internally_tagged_with_contract_names() {
        let json = serde_json::to_value(Event::Bid(bid())).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "auction",
                "bidder",
                "channel",
                "date_time",
                "extra",
                "price",
                "type",
                "url"
            ]
        );
        assert_eq!(json["type"], "bid");
    }

    #[test]
    fn nexmark_event_parses_keys_in_any_order() {
        let line = r#"{"price":123,"auction":1000,"bidder":1001,"channel":"Google","url":"https://www.nexmark.com/x/item.htm","extra":"","date_time":1700000001234,"type":"bid"}"#;
        let event = crate::parse::parse_event(&mut Default::default(), line.as_bytes()).unwrap();
        assert_eq!(event, Event::Bid(bid()));
        assert_eq!(event.date_time(), 1_700_000_001_234);
    }

    #[test]
    fn nexmark_event_nominal_sizes() {
        assert_eq!(bid().nominal_size_bytes(), 32 + 6 + 34);
    }
}

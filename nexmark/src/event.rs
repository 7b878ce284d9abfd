//! The three Nexmark event kinds (person, auction, bid) with exactly the fields of
//! NEXMARK.md, and their JSON form: one object with `"type"` plus those fields.
//!
//! Strings are [`Text`] (`Cow<'static, str>`) so that the generator can hand out
//! borrowed slices of static pools without allocating, while parsed events own their
//! strings. `Event`'s deserializer is hand-written (not serde's internally-tagged
//! derive, which buffers every field into a temporary tree) so that parsing a line
//! allocates nothing beyond the event's own strings.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// A string field: borrowed from a static pool when generated, owned when parsed.
pub type Text = Cow<'static, str>;

/// Bytes a numeric field counts for in the nominal size of an event.
const NOMINAL_NUMERIC_BYTES: usize = 8;

/// A person registering. `date_time` is in milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    pub id: u64,
    pub name: Text,
    pub email_address: Text,
    pub credit_card: Text,
    pub city: Text,
    pub state: Text,
    pub date_time: i64,
    pub extra: Text,
}

/// An auction opening. `date_time` and `expires` are in milliseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auction {
    pub id: u64,
    pub item_name: Text,
    pub description: Text,
    pub initial_bid: u64,
    pub reserve: u64,
    pub date_time: i64,
    pub expires: i64,
    pub seller: u64,
    pub category: u64,
    pub extra: Text,
}

/// A bid on an auction. `date_time` is in milliseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bid {
    pub auction: u64,
    pub bidder: u64,
    pub price: u64,
    pub channel: Text,
    pub url: Text,
    pub date_time: i64,
    pub extra: Text,
}

/// One Nexmark event. Serializes as `{"type":"person"|"auction"|"bid", ...fields}`.
///
/// Persons and auctions are boxed: they are 4 in 50 events but up to 1.5 times a bid's
/// size, and every event of a batch is moved a few times on its way through a
/// query, so a bid-sized `Event` (112 bytes, not 160) saves a third of that copying.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
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

// ---------------------------------------------------------------------------
// Deserialization of `Event`: one pass over the object's keys, in any order.

const KINDS: &[&str] = &["person", "auction", "bid"];

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
const BID_FIELDS: &[&str] = &[
    "auction",
    "bidder",
    "price",
    "channel",
    "url",
    "date_time",
    "extra",
];
const ALL_FIELDS: &[&str] = &[
    "type",
    "id",
    "name",
    "email_address",
    "credit_card",
    "city",
    "state",
    "date_time",
    "extra",
    "item_name",
    "description",
    "initial_bid",
    "reserve",
    "expires",
    "seller",
    "category",
    "auction",
    "bidder",
    "price",
    "channel",
    "url",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Person,
    Auction,
    Bid,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Person => "person",
            Kind::Auction => "auction",
            Kind::Bid => "bid",
        }
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl Visitor<'_> for KindVisitor {
            type Value = Kind;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"person\", \"auction\" or \"bid\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
                match v {
                    "person" => Ok(Kind::Person),
                    "auction" => Ok(Kind::Auction),
                    "bid" => Ok(Kind::Bid),
                    other => Err(E::unknown_variant(other, KINDS)),
                }
            }
        }
        d.deserialize_str(KindVisitor)
    }
}

/// A key of an event object. Keys are matched without allocating.
#[derive(Clone, Copy)]
enum Field {
    Type,
    Id,
    Name,
    EmailAddress,
    CreditCard,
    City,
    State,
    DateTime,
    Extra,
    ItemName,
    Description,
    InitialBid,
    Reserve,
    Expires,
    Seller,
    Category,
    Auction,
    Bidder,
    Price,
    Channel,
    Url,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Nexmark field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "type" => Field::Type,
                    "id" => Field::Id,
                    "name" => Field::Name,
                    "email_address" => Field::EmailAddress,
                    "credit_card" => Field::CreditCard,
                    "city" => Field::City,
                    "state" => Field::State,
                    "date_time" => Field::DateTime,
                    "extra" => Field::Extra,
                    "item_name" => Field::ItemName,
                    "description" => Field::Description,
                    "initial_bid" => Field::InitialBid,
                    "reserve" => Field::Reserve,
                    "expires" => Field::Expires,
                    "seller" => Field::Seller,
                    "category" => Field::Category,
                    "auction" => Field::Auction,
                    "bidder" => Field::Bidder,
                    "price" => Field::Price,
                    "channel" => Field::Channel,
                    "url" => Field::Url,
                    other => return Err(E::unknown_field(other, ALL_FIELDS)),
                })
            }
        }
        d.deserialize_identifier(FieldVisitor)
    }
}

/// Every field any kind may have; filled in whatever order the keys come.
#[derive(Default)]
struct Slots {
    kind: Option<Kind>,
    id: Option<u64>,
    name: Option<Text>,
    email_address: Option<Text>,
    credit_card: Option<Text>,
    city: Option<Text>,
    state: Option<Text>,
    date_time: Option<i64>,
    extra: Option<Text>,
    item_name: Option<Text>,
    description: Option<Text>,
    initial_bid: Option<u64>,
    reserve: Option<u64>,
    expires: Option<i64>,
    seller: Option<u64>,
    category: Option<u64>,
    auction: Option<u64>,
    bidder: Option<u64>,
    price: Option<u64>,
    channel: Option<Text>,
    url: Option<Text>,
}

fn put<'de, T, A>(slot: &mut Option<T>, name: &'static str, map: &mut A) -> Result<(), A::Error>
where
    T: Deserialize<'de>,
    A: MapAccess<'de>,
{
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

fn need<T, E: de::Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
    slot.ok_or_else(|| E::missing_field(name))
}

fn reject<E: de::Error>(present: bool, name: &'static str, kind: Kind) -> Result<(), E> {
    if present {
        let expected = match kind {
            Kind::Person => PERSON_FIELDS,
            Kind::Auction => AUCTION_FIELDS,
            Kind::Bid => BID_FIELDS,
        };
        return Err(E::custom(format_args!(
            "field `{name}` does not belong to a {}; expected {}",
            kind.name(),
            expected.join(", ")
        )));
    }
    Ok(())
}

impl Slots {
    fn into_event<E: de::Error>(self) -> Result<Event, E> {
        let kind = need(self.kind, "type")?;
        match kind {
            Kind::Person => {
                for (set, name) in [
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
                ] {
                    reject(set, name, kind)?;
                }
                Ok(Event::Person(Box::new(Person {
                    id: need(self.id, "id")?,
                    name: need(self.name, "name")?,
                    email_address: need(self.email_address, "email_address")?,
                    credit_card: need(self.credit_card, "credit_card")?,
                    city: need(self.city, "city")?,
                    state: need(self.state, "state")?,
                    date_time: need(self.date_time, "date_time")?,
                    extra: need(self.extra, "extra")?,
                })))
            }
            Kind::Auction => {
                for (set, name) in [
                    (self.name.is_some(), "name"),
                    (self.email_address.is_some(), "email_address"),
                    (self.credit_card.is_some(), "credit_card"),
                    (self.city.is_some(), "city"),
                    (self.state.is_some(), "state"),
                    (self.auction.is_some(), "auction"),
                    (self.bidder.is_some(), "bidder"),
                    (self.price.is_some(), "price"),
                    (self.channel.is_some(), "channel"),
                    (self.url.is_some(), "url"),
                ] {
                    reject(set, name, kind)?;
                }
                Ok(Event::Auction(Box::new(Auction {
                    id: need(self.id, "id")?,
                    item_name: need(self.item_name, "item_name")?,
                    description: need(self.description, "description")?,
                    initial_bid: need(self.initial_bid, "initial_bid")?,
                    reserve: need(self.reserve, "reserve")?,
                    date_time: need(self.date_time, "date_time")?,
                    expires: need(self.expires, "expires")?,
                    seller: need(self.seller, "seller")?,
                    category: need(self.category, "category")?,
                    extra: need(self.extra, "extra")?,
                })))
            }
            Kind::Bid => {
                for (set, name) in [
                    (self.id.is_some(), "id"),
                    (self.name.is_some(), "name"),
                    (self.email_address.is_some(), "email_address"),
                    (self.credit_card.is_some(), "credit_card"),
                    (self.city.is_some(), "city"),
                    (self.state.is_some(), "state"),
                    (self.item_name.is_some(), "item_name"),
                    (self.description.is_some(), "description"),
                    (self.initial_bid.is_some(), "initial_bid"),
                    (self.reserve.is_some(), "reserve"),
                    (self.expires.is_some(), "expires"),
                    (self.seller.is_some(), "seller"),
                    (self.category.is_some(), "category"),
                ] {
                    reject(set, name, kind)?;
                }
                Ok(Event::Bid(Bid {
                    auction: need(self.auction, "auction")?,
                    bidder: need(self.bidder, "bidder")?,
                    price: need(self.price, "price")?,
                    channel: need(self.channel, "channel")?,
                    url: need(self.url, "url")?,
                    date_time: need(self.date_time, "date_time")?,
                    extra: need(self.extra, "extra")?,
                }))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EventVisitor;
        impl<'de> Visitor<'de> for EventVisitor {
            type Value = Event;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Nexmark event object with a \"type\" field")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event, A::Error> {
                let mut s = Slots::default();
                while let Some(key) = map.next_key::<Field>()? {
                    match key {
                        Field::Type => put(&mut s.kind, "type", &mut map)?,
                        Field::Id => put(&mut s.id, "id", &mut map)?,
                        Field::Name => put(&mut s.name, "name", &mut map)?,
                        Field::EmailAddress => {
                            put(&mut s.email_address, "email_address", &mut map)?
                        }
                        Field::CreditCard => put(&mut s.credit_card, "credit_card", &mut map)?,
                        Field::City => put(&mut s.city, "city", &mut map)?,
                        Field::State => put(&mut s.state, "state", &mut map)?,
                        Field::DateTime => put(&mut s.date_time, "date_time", &mut map)?,
                        Field::Extra => put(&mut s.extra, "extra", &mut map)?,
                        Field::ItemName => put(&mut s.item_name, "item_name", &mut map)?,
                        Field::Description => put(&mut s.description, "description", &mut map)?,
                        Field::InitialBid => put(&mut s.initial_bid, "initial_bid", &mut map)?,
                        Field::Reserve => put(&mut s.reserve, "reserve", &mut map)?,
                        Field::Expires => put(&mut s.expires, "expires", &mut map)?,
                        Field::Seller => put(&mut s.seller, "seller", &mut map)?,
                        Field::Category => put(&mut s.category, "category", &mut map)?,
                        Field::Auction => put(&mut s.auction, "auction", &mut map)?,
                        Field::Bidder => put(&mut s.bidder, "bidder", &mut map)?,
                        Field::Price => put(&mut s.price, "price", &mut map)?,
                        Field::Channel => put(&mut s.channel, "channel", &mut map)?,
                        Field::Url => put(&mut s.url, "url", &mut map)?,
                    }
                }
                s.into_event()
            }
        }
        d.deserialize_map(EventVisitor)
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
    fn nexmark_event_deserializes_keys_in_any_order() {
        let line = r#"{"price":123,"auction":1000,"bidder":1001,"channel":"Google","url":"https://www.nexmark.com/x/item.htm","extra":"","date_time":1700000001234,"type":"bid"}"#;
        let event: Event = serde_json::from_str(line).unwrap();
        assert_eq!(event, Event::Bid(bid()));
        assert_eq!(event.date_time(), 1_700_000_001_234);
    }

    #[test]
    fn nexmark_event_rejects_field_of_another_kind() {
        let line = r#"{"type":"bid","auction":1000,"bidder":1001,"price":1,"channel":"c","url":"u","date_time":0,"extra":"","seller":5}"#;
        let err = serde_json::from_str::<Event>(line).unwrap_err().to_string();
        assert!(
            err.contains("field `seller` does not belong to a bid"),
            "{err}"
        );
    }

    #[test]
    fn nexmark_event_nominal_sizes() {
        assert_eq!(bid().nominal_size_bytes(), 32 + 6 + 34);
    }
}

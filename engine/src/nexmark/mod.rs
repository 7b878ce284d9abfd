//! Nexmark, the standard stream-processing benchmark (see `shared/NEXMARK.md`, the
//! contract): the event model, a deterministic splittable generator, and the JSON
//! Lines interchange format. Queries live with the jobs that run them.

pub mod event;
pub mod generator;
pub mod json;
pub mod queries;

pub use event::{Auction, Bid, Event, Person, Text};
pub use generator::{interleaved_chunks, split, Generator, GeneratorConfig, GeneratorConfigError};
pub use json::{write_json_line, EventReader, EventWriter, ParseError, ParseErrorKind};

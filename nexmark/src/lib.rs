//! Nexmark, the standard stream-processing benchmark (see `shared/NEXMARK.md`, the
//! contract), as a user of Dirigo's engine: the event model, a deterministic
//! splittable generator, the JSON Lines interchange format, the queries written on
//! the public dataflow API, and the driver that runs one query end to end (what
//! `dirigo run` does). The engine knows nothing of this crate.

pub mod event;
pub mod file;
pub mod generator;
pub mod json;
pub mod machine;
pub mod parse;
pub mod queries;
pub mod run;

pub use event::{Auction, Bid, Event, Person, Text};
pub use file::{FileOptions, FileSource, FileSplit};
pub use generator::{
    bids_before, interleaved_chunks, split, Generator, GeneratorConfig, GeneratorConfigError,
};
pub use json::{write_json_line, EventReader, EventWriter, ParseError, ParseErrorKind};

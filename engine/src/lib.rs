//! placeholder
pub mod ring;
pub mod sync;

//! placeholder
pub mod doorbell;
pub mod ring;
pub mod sync;

//! Dirigo's engine: the thread-per-core runtime, its sources and its built-in jobs.

pub mod nexmark;

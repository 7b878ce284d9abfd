//! Dirigo's engine: the thread-per-core virtual actor runtime and, on top of it,
//! the streaming dataflow layer.
//!
//! Entry points: `runtime::Runtime` (start shards, send, migrate, stats), the
//! `actor::Actor` trait, and `runtime::shard::ShardCore`, the per-core state
//! machine that the executor loop and the simulation tests drive.

pub mod actor;
pub mod autoscale;
pub mod clock;
pub mod dataflow;
pub mod doorbell;
pub mod ids;
pub mod ring;
pub mod runtime;
pub mod sync;

pub use actor::{
    decode_state, encode_state, Actor, ActorFactory, BoxActor, Context, SchedCtx, StateBytes,
};
pub use ids::{ActorId, JobId, ShardId};
pub use runtime::{Runtime, RuntimeConfig};

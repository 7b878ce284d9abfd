//! The wire between Dirigo nodes: frames and their rkyv payloads; later the
//! transport.
//!
//! # Boundary
//!
//! This crate owns the byte format of everything that crosses a node
//! boundary, and (when the transport lands) every socket system call. It
//! knows nothing of actors, operators, key groups or dataflow: a frame is a
//! `kind: u8`, `flags: u8` and payload bytes, and the codec serializes any
//! rkyv type it is handed. `engine` decides what kinds mean and what types
//! travel; it never touches a socket or a frame header itself.
//!
//! - [`frame`]: the 16-byte-header, 16-aligned frame; `encode_frame`, and a
//!   streaming [`FrameDecoder`] bounded by `frame_bytes_max`.
//! - [`codec`]: rkyv 0.8 into a frame payload ([`to_frame`]) and validated,
//!   zero-copy access to a received one ([`access_frame`]).
//!
//! # Not yet here
//!
//! The io_uring TCP transport (glommio sockets on each shard's executor),
//! handshake and authentication, and backpressure come later and will sit on
//! top of `FrameDecoder`/`encode_frame` unchanged: a connection reads into
//! `push` and writes encoded frames. Until then the crate does no I/O at all.
//!
//! # Bad input
//!
//! Everything read from a peer is untrusted: oversize lengths, crc
//! mismatches, reserved bits and invalid archives are a [`FrameError`]
//! naming the frame number and stream offset, never a panic.

pub mod codec;
pub mod frame;

pub use codec::{access_frame, to_frame};
pub use frame::{
    encode_frame, frame_bytes, Frame, FrameConfig, FrameDecoder, FrameError, FRAME_ALIGNMENT_BYTES,
    FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES,
};

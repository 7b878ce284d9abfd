//! The wire between Dirigo nodes: frames and their rkyv payloads, the
//! mutual handshake, and connections over TCP on glommio.
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
//! - [`handshake`]: mutual authentication, sans I/O: an HMAC-SHA256
//!   challenge both ways over a shared secret, the cluster id and protocol
//!   version checked, fixed-size messages.
//! - [`conn`]: a connection over glommio's TCP (io_uring): `connect` and
//!   `accept` run the handshake within a timeout, then frames both ways
//!   through `encode_frame` and a `FrameDecoder`; heartbeat frames.
//! - [`link`]: sans I/O, a link to one peer that outlives its connections:
//!   messages numbered and kept until acked, sent again after a reconnect,
//!   delivered once each and in order; every frame sealed with AES-128-GCM
//!   under the handshake's session key (the body encrypted, the header
//!   authenticated, each frame bound to its place on the connection); the receiver's inbox bounded by credits; a
//!   peer's restart detected; heartbeats and a dead-connection check;
//!   [`link::Backoff`] for reconnects.
//!
//! - [`session`]: a `Link` driven over `conn` connections on a glommio
//!   executor, dialing again with `Backoff`.
//!
//! # Not yet here
//!
//! The cluster's control plane (`dirigo node`, in the binary) runs over
//! sessions. No engine message crosses a connection yet: remote actor
//! sends come on top.
//!
//! # Bad input
//!
//! Everything read from a peer is untrusted: oversize lengths, crc
//! mismatches, reserved bits, frames flagged sealed where not allowed and
//! invalid archives are a [`FrameError`]
//! naming the frame number and stream offset, never a panic.

pub mod codec;
pub mod conn;
pub mod frame;
pub mod handshake;
pub mod link;
pub mod session;

pub use codec::{access_frame, to_frame};
pub use frame::{
    encode_frame, frame_bytes, Frame, FrameConfig, FrameDecoder, FrameError, FRAME_ALIGNMENT_BYTES,
    FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES,
};

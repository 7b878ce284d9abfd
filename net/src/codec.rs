//! rkyv 0.8 inside frames: serialize a value straight into a frame payload,
//! and validate a received payload once, then read it in place.
//!
//! [`to_frame`] serializes into the output buffer right after a reserved
//! header, with positions counted from the payload start ([`PayloadWriter`]),
//! so rkyv's internal alignment padding is relative to the payload, which
//! the receiver holds 16-aligned (see [`crate::frame`]). No intermediate
//! buffer, no copy.
//!
//! [`access_frame`] runs rkyv's `bytecheck` validation over the payload
//! (`rkyv::access`), which checks every relative pointer, length, UTF-8
//! string and alignment, and then returns a reference into the decoder's
//! buffer. Garbage that passes the frame crc but is not a valid archive is a
//! [`FrameError::Archive`], never undefined behaviour. Validate once per
//! frame and keep the reference; do not call it again per field.
//!
//! rkyv's default features in 0.8 are `std` and `bytecheck`, which is what
//! the workspace uses (`rkyv = "0.8"`), with the default format: little
//! endian, aligned, 32-bit relative pointers. Types whose archived alignment
//! exceeds 16 bytes are not supported: the frame guarantees only 16.

use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::{Positional, Writer};
use rkyv::{Archive, Archived, Portable, Serialize};

use crate::frame::{begin_frame, finish_frame, Frame, FrameConfig, FrameError, FRAME_HEADER_BYTES};

/// rkyv writer appending to a frame under construction. Positions are
/// counted from the payload start, so rkyv aligns relative to it.
pub struct PayloadWriter<'w> {
    out: &'w mut Vec<u8>,
    payload_start: usize,
}

impl Positional for PayloadWriter<'_> {
    fn pos(&self) -> usize {
        self.out.len() - self.payload_start
    }
}

impl<E> Writer<E> for PayloadWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }
}

/// The rkyv serializer [`to_frame`] uses; a type must implement
/// `Serialize` for it (`#[derive(rkyv::Serialize)]` does).
pub type FrameSerializer<'w, 'a> =
    HighSerializer<PayloadWriter<'w>, ArenaHandle<'a>, rancor::Error>;

/// Serializes `value` with rkyv as the payload of one frame of `kind`,
/// appended to `out`. On error `out` is unchanged.
///
/// The archive is written in full before its size is known, so a value too
/// large for `frame_bytes_max` costs its serialization before it is refused.
pub fn to_frame<T>(
    config: &FrameConfig,
    kind: u8,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), FrameError>
where
    T: for<'w, 'a> Serialize<FrameSerializer<'w, 'a>>,
{
    let start = begin_frame(out);
    let writer = PayloadWriter {
        out: &mut *out,
        payload_start: start + FRAME_HEADER_BYTES,
    };
    if let Err(error) = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, writer) {
        out.truncate(start);
        return Err(FrameError::Serialize {
            kind,
            message: error.to_string(),
        });
    }
    finish_frame(config, kind, start, out)
}

/// Validates the frame's payload as an archived `T` and returns a reference
/// to it, read in place in the decoder's buffer.
pub fn access_frame<'a, T>(frame: &Frame<'a>) -> Result<&'a Archived<T>, FrameError>
where
    T: Archive,
    Archived<T>: Portable + for<'v> CheckBytes<HighValidator<'v, rancor::Error>>,
{
    rkyv::access::<Archived<T>, rancor::Error>(frame.payload).map_err(|error| FrameError::Archive {
        frame_number: frame.number,
        stream_offset: frame.stream_offset,
        kind: frame.kind,
        message: error.to_string(),
    })
}

//! The wire frame between nodes: layout, encoder, and a streaming decoder
//! fed with arbitrary byte chunks.
//!
//! # Layout
//!
//! ```text
//! offset 0           4            8        9         10             12          16
//!        [length u32 LE][crc32c u32 LE][kind u8][flags u8][reserved u16][pad u32 = 0]
//!        [payload: length bytes][zero padding to a multiple of 16]
//! ```
//!
//! - `length` counts payload bytes only. A frame occupies
//!   [`frame_bytes`]`(length)` = 16 + `length` rounded up to 16 bytes.
//! - crc32c covers header bytes 8..16 (kind, flags, reserved, pad) and the
//!   payload; not the padding, which the decoder skips unread.
//! - `flags`, `reserved` and pad are written as zero, except
//!   [`FLAG_SEALED`]. The decoder passes `flags` through (a sealed frame
//!   only where allowed, below) and rejects a nonzero `reserved` or pad,
//!   so that a future use of those bits cannot be silently misread by an
//!   old peer.
//! - A frame flagged [`FLAG_SEALED`] has a crc field of 0 and no crc: its
//!   payload is sealed by the layer above (the link's AES-128-GCM tag
//!   covers the frame's kind, its link header and its body, so a changed
//!   byte fails the tag where it would have failed the crc). A decoder
//!   takes such frames only once told to ([`FrameDecoder::allow_sealed`]:
//!   a session does, on a connection that carries only link frames);
//!   elsewhere one is refused ([`FrameError::Unsealed`]), so a frame with
//!   the bit flipped on is never taken unchecked.
//!
//! # Alignment guarantee
//!
//! The header is 12 bytes of fields padded to 16, and every frame is padded
//! to a multiple of 16, so in a stream every frame and every payload starts
//! at an offset that is a multiple of [`FRAME_ALIGNMENT_BYTES`]. The decoder
//! keeps its buffer in a 16-aligned allocation and only ever moves bytes by
//! whole frames, so every [`Frame::payload`] it returns starts at a 16-aligned
//! address. rkyv archives of types whose alignment is at most 16 (every
//! primitive, `String`, `Vec`, ...) can therefore be validated and read in
//! place, with no copy (see [`crate::codec`]).
//!
//! # Bounds
//!
//! `FrameConfig::frame_bytes_max` bounds a whole frame, header and padding
//! included (default [`FRAME_BYTES_MAX_DEFAULT`], 16 MiB). The encoder refuses
//! a larger frame; the decoder rejects one as soon as it has read the length
//! field, before buffering its payload; and the decoder's buffer never holds
//! more than `frame_bytes_max` bytes: [`FrameDecoder::push`] takes only what
//! fits and says how much it took.
//!
//! # Errors
//!
//! An oversize length, a bad crc, nonzero reserved bits or a frame flagged
//! sealed where sealed frames are not allowed is a [`FrameError`]
//! naming the frame number (from 0) and its byte offset in the stream. The
//! stream cannot be resynchronized after that (the next frame boundary is
//! unknown): the decoder stays failed and the connection must be closed.

use std::fmt;

use rkyv::util::AlignedVec;

/// Bytes of a frame header, padding included.
pub const FRAME_HEADER_BYTES: usize = 16;

/// Alignment, in bytes, of every frame and payload start (see the module
/// header).
pub const FRAME_ALIGNMENT_BYTES: usize = 16;

/// Default bound on a whole frame.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;

/// The frame's payload is sealed by the layer above and carries no crc
/// (see the module header).
pub const FLAG_SEALED: u8 = 0x80;

/// Largest `frame_bytes_max` accepted: 1 GiB, far under what the u32
/// length field can express, so that offset arithmetic never overflows.
pub const FRAME_BYTES_LIMIT: usize = 1 << 30;

/// Bytes of a frame carrying `payload_bytes` of payload: header plus payload
/// rounded up to [`FRAME_ALIGNMENT_BYTES`].
pub const fn frame_bytes(payload_bytes: usize) -> usize {
    FRAME_HEADER_BYTES + payload_bytes.next_multiple_of(FRAME_ALIGNMENT_BYTES)
}

/// Bounds of one connection's frames. Both ends must agree on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameConfig {
    frame_bytes_max: usize,
}

impl FrameConfig {
    /// A config bounding whole frames to `frame_bytes_max` bytes, which must
    /// be a multiple of 16 from [`FRAME_HEADER_BYTES`] to [`FRAME_BYTES_LIMIT`].
    pub fn new(frame_bytes_max: usize) -> Result<Self, FrameError> {
        let reason = if frame_bytes_max < FRAME_HEADER_BYTES {
            "smaller than a frame header"
        } else if frame_bytes_max > FRAME_BYTES_LIMIT {
            "larger than FRAME_BYTES_LIMIT"
        } else if !frame_bytes_max.is_multiple_of(FRAME_ALIGNMENT_BYTES) {
            "not a multiple of FRAME_ALIGNMENT_BYTES"
        } else {
            return Ok(FrameConfig { frame_bytes_max });
        };
        Err(FrameError::InvalidConfig {
            frame_bytes_max,
            reason,
        })
    }

    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// Largest payload a frame may carry under this config.
    pub fn payload_bytes_max(&self) -> usize {
        self.frame_bytes_max - FRAME_HEADER_BYTES
    }
}

impl Default for FrameConfig {
    fn default() -> Self {
        FrameConfig {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
        }
    }
}

/// One decoded frame; `payload` borrows the decoder's buffer and is
/// 16-aligned in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Zero-based number of the frame in its stream.
    pub number: u64,
    /// Byte offset of the frame's header from the start of the stream.
    pub stream_offset: u64,
    pub kind: u8,
    pub flags: u8,
    pub payload: &'a [u8],
}

/// Error from encoding, decoding or accessing a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A frame's length field announces more than `frame_bytes_max`.
    Oversize {
        frame_number: u64,
        stream_offset: u64,
        frame_bytes: u64,
        frame_bytes_max: usize,
    },
    /// The crc32c in the header does not match kind, flags and payload.
    Checksum {
        frame_number: u64,
        stream_offset: u64,
        crc_expected: u32,
        crc_actual: u32,
    },
    /// The reserved header bits are not zero (a newer or broken peer).
    ReservedNotZero {
        frame_number: u64,
        stream_offset: u64,
    },
    /// A frame flagged [`FLAG_SEALED`] where sealed frames are not
    /// allowed, or with a crc field other than 0.
    Unsealed {
        frame_number: u64,
        stream_offset: u64,
    },
    /// The payload's rkyv archive failed validation.
    Archive {
        frame_number: u64,
        stream_offset: u64,
        kind: u8,
        message: String,
    },
    /// Encoding refused: the frame would exceed `frame_bytes_max`. Nothing
    /// was appended to the output.
    PayloadTooLarge {
        payload_bytes: usize,
        frame_bytes_max: usize,
    },
    /// rkyv serialization failed. Nothing was appended to the output.
    Serialize { kind: u8, message: String },
    /// A `FrameConfig` bound outside the accepted range.
    InvalidConfig {
        frame_bytes_max: usize,
        reason: &'static str,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Oversize {
                frame_number,
                stream_offset,
                frame_bytes,
                frame_bytes_max,
            } => write!(
                f,
                "frame {frame_number} at stream offset {stream_offset}: length gives {frame_bytes} bytes, over frame_bytes_max {frame_bytes_max}"
            ),
            FrameError::Checksum {
                frame_number,
                stream_offset,
                crc_expected,
                crc_actual,
            } => write!(
                f,
                "frame {frame_number} at stream offset {stream_offset}: crc32c mismatch: header says {crc_expected:#010x}, data gives {crc_actual:#010x}"
            ),
            FrameError::ReservedNotZero {
                frame_number,
                stream_offset,
            } => write!(
                f,
                "frame {frame_number} at stream offset {stream_offset}: reserved header bits are not zero"
            ),
            FrameError::Unsealed {
                frame_number,
                stream_offset,
            } => write!(
                f,
                "frame {frame_number} at stream offset {stream_offset}: flagged sealed (no crc) where sealed frames are not allowed, or with a crc field set"
            ),
            FrameError::Archive {
                frame_number,
                stream_offset,
                kind,
                message,
            } => write!(
                f,
                "frame {frame_number} (kind {kind}) at stream offset {stream_offset}: invalid archive: {message}"
            ),
            FrameError::PayloadTooLarge {
                payload_bytes,
                frame_bytes_max,
            } => write!(
                f,
                "payload of {payload_bytes} bytes does not fit a frame of frame_bytes_max {frame_bytes_max}"
            ),
            FrameError::Serialize { kind, message } => {
                write!(f, "serializing a frame of kind {kind}: {message}")
            }
            FrameError::InvalidConfig {
                frame_bytes_max,
                reason,
            } => write!(f, "frame_bytes_max {frame_bytes_max}: {reason}"),
        }
    }
}

impl std::error::Error for FrameError {}

fn frame_crc(header_tail: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header_tail), payload)
}

/// Appends one frame carrying `payload` to `out`. On error `out` is unchanged.
pub fn encode_frame(
    config: &FrameConfig,
    kind: u8,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    if payload.len() > config.payload_bytes_max() {
        return Err(FrameError::PayloadTooLarge {
            payload_bytes: payload.len(),
            frame_bytes_max: config.frame_bytes_max,
        });
    }
    let start = begin_frame(out);
    out.extend_from_slice(payload);
    finish_frame(config, kind, start, out)
}

/// Reserves a header at the end of `out` and returns the frame's start; the
/// payload is then appended, and [`finish_frame`] fills the header in.
pub(crate) fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.resize(start + FRAME_HEADER_BYTES, 0);
    start
}

/// Completes the frame begun at `start`: checks the bound, writes length,
/// crc and kind, pads to 16. On error truncates `out` back to `start`.
pub(crate) fn finish_frame(
    config: &FrameConfig,
    kind: u8,
    start: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    finish(config, kind, false, start, out)
}

/// [`finish_frame`] for a payload sealed by the caller: flagged
/// [`FLAG_SEALED`], with no crc.
pub(crate) fn finish_sealed_frame(
    config: &FrameConfig,
    kind: u8,
    start: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    finish(config, kind, true, start, out)
}

fn finish(
    config: &FrameConfig,
    kind: u8,
    sealed: bool,
    start: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let payload_bytes = out.len() - start - FRAME_HEADER_BYTES;
    if payload_bytes > config.payload_bytes_max() {
        out.truncate(start);
        return Err(FrameError::PayloadTooLarge {
            payload_bytes,
            frame_bytes_max: config.frame_bytes_max,
        });
    }
    let (header, payload) = out[start..].split_at_mut(FRAME_HEADER_BYTES);
    header[8] = kind; // reserved and pad stay zero
    let crc = if sealed {
        header[9] = FLAG_SEALED;
        0
    } else {
        frame_crc(&header[8..], payload)
    };
    header[0..4].copy_from_slice(&(payload_bytes as u32).to_le_bytes());
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    out.resize(start + frame_bytes(payload_bytes), 0);
    Ok(())
}

/// Streaming decoder for one connection (see the module header).
///
/// Feed it with [`push`](Self::push), drain it with
/// [`next_frame`](Self::next_frame):
///
/// ```
/// # use dirigo_net::frame::*;
/// let config = FrameConfig::default();
/// let mut wire = Vec::new();
/// encode_frame(&config, 7, b"hello", &mut wire).unwrap();
/// let mut decoder = FrameDecoder::new(config);
/// let mut input: &[u8] = &wire;
/// while !input.is_empty() {
///     let taken = decoder.push(&input[..input.len().min(3)]);
///     input = &input[taken..];
///     while let Some(frame) = decoder.next_frame().unwrap() {
///         assert_eq!((frame.kind, frame.payload), (7, &b"hello"[..]));
///     }
/// }
/// ```
pub struct FrameDecoder {
    config: FrameConfig,
    /// Holds `[start..]` unconsumed bytes; never longer than `frame_bytes_max`.
    buffer: AlignedVec<FRAME_ALIGNMENT_BYTES>,
    /// First unconsumed byte; always a multiple of 16.
    start: usize,
    /// Number of the frame at `start`.
    frame_number: u64,
    /// Stream offset of the byte at `start`.
    stream_offset: u64,
    /// Set by the first error; every later call returns it again.
    failed: Option<FrameError>,
    /// Whether frames flagged `FLAG_SEALED` are taken (without a crc).
    sealed_allowed: bool,
}

impl FrameDecoder {
    pub fn new(config: FrameConfig) -> Self {
        FrameDecoder {
            config,
            buffer: AlignedVec::new(),
            start: 0,
            frame_number: 0,
            stream_offset: 0,
            failed: None,
            sealed_allowed: false,
        }
    }

    /// From now on take frames flagged [`FLAG_SEALED`], whose payload the
    /// caller authenticates itself, without a crc (see the module
    /// header); before, such a frame is an error.
    pub fn allow_sealed(&mut self) {
        self.sealed_allowed = true;
    }

    pub fn config(&self) -> &FrameConfig {
        &self.config
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// Bytes allocated for the buffer; never more than `frame_bytes_max`.
    pub fn buffer_capacity_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    /// Frames returned so far.
    pub fn frames_decoded(&self) -> u64 {
        self.frame_number
    }

    /// Buffers a prefix of `bytes` and returns its length: all of `bytes`
    /// when there is room, less when the buffer would pass
    /// `frame_bytes_max`, and 0 when it is full of complete frames (drain
    /// them with `next_frame`) or after an error. Frames borrowed from an
    /// earlier `next_frame` are released by this call.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        self.compact_for(bytes.len());
        let taken = bytes
            .len()
            .min(self.config.frame_bytes_max - self.buffer.len());
        self.reserve_bounded(taken);
        self.buffer.extend_from_slice(&bytes[..taken]);
        debug_assert!(self.buffer.len() <= self.config.frame_bytes_max);
        taken
    }

    /// Moves the unconsumed bytes to the front when that makes room for
    /// `incoming_bytes` that would not otherwise fit. Bytes move by whole
    /// frames (`start` is a multiple of 16), so alignment is preserved.
    fn compact_for(&mut self, incoming_bytes: usize) {
        debug_assert_eq!(self.start % FRAME_ALIGNMENT_BYTES, 0);
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        } else if self.start > 0 && self.config.frame_bytes_max - self.buffer.len() < incoming_bytes
        {
            let unconsumed = self.buffer.len() - self.start;
            self.buffer.as_mut_slice().copy_within(self.start.., 0);
            self.buffer.resize(unconsumed, 0);
            self.start = 0;
        }
    }

    /// Grows the allocation geometrically but never past `frame_bytes_max`.
    fn reserve_bounded(&mut self, additional: usize) {
        let needed = self.buffer.len() + additional;
        if needed > self.buffer.capacity() {
            let target = (self.buffer.capacity() * 2)
                .max(needed)
                .min(self.config.frame_bytes_max);
            self.buffer.reserve_exact(target - self.buffer.len());
        }
    }

    /// Whether `next_frame` would return now without more bytes: a whole
    /// frame is buffered, or the stream has failed, or the next frame's
    /// length is over the bound (which `next_frame` reports).
    pub fn frame_ready(&self) -> bool {
        if self.failed.is_some() {
            return true;
        }
        let available = &self.buffer.as_slice()[self.start..];
        if available.len() < 4 {
            return false;
        }
        let length = u32::from_le_bytes([available[0], available[1], available[2], available[3]]);
        let frame_bytes = FRAME_HEADER_BYTES as u64
            + (length as u64).next_multiple_of(FRAME_ALIGNMENT_BYTES as u64);
        frame_bytes > self.config.frame_bytes_max as u64 || available.len() as u64 >= frame_bytes
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the
    /// error that ends the stream. The frame borrows the decoder until the
    /// next call.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let available = &self.buffer.as_slice()[self.start..];
        if available.len() < 4 {
            return Ok(None);
        }
        // Check the length as soon as it is known, before buffering a payload.
        let length = u32::from_le_bytes([available[0], available[1], available[2], available[3]]);
        let frame_bytes = FRAME_HEADER_BYTES as u64
            + (length as u64).next_multiple_of(FRAME_ALIGNMENT_BYTES as u64);
        if frame_bytes > self.config.frame_bytes_max as u64 {
            return self.fail(FrameError::Oversize {
                frame_number: self.frame_number,
                stream_offset: self.stream_offset,
                frame_bytes,
                frame_bytes_max: self.config.frame_bytes_max,
            });
        }
        let frame_bytes = frame_bytes as usize;
        if available.len() < frame_bytes {
            return Ok(None);
        }
        let header = &available[..FRAME_HEADER_BYTES];
        let payload_range = FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + length as usize;
        let crc_expected = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if header[9] & FLAG_SEALED != 0 {
            if !self.sealed_allowed || crc_expected != 0 {
                return self.fail(FrameError::Unsealed {
                    frame_number: self.frame_number,
                    stream_offset: self.stream_offset,
                });
            }
        } else {
            let crc_actual = frame_crc(&header[8..], &available[payload_range.clone()]);
            if crc_actual != crc_expected {
                return self.fail(FrameError::Checksum {
                    frame_number: self.frame_number,
                    stream_offset: self.stream_offset,
                    crc_expected,
                    crc_actual,
                });
            }
        }
        if header[10..].iter().any(|&b| b != 0) {
            return self.fail(FrameError::ReservedNotZero {
                frame_number: self.frame_number,
                stream_offset: self.stream_offset,
            });
        }
        let (kind, flags) = (header[8], header[9]);
        let frame_start = self.start;
        let (number, stream_offset) = (self.frame_number, self.stream_offset);
        self.start += frame_bytes;
        self.frame_number += 1;
        self.stream_offset += frame_bytes as u64;
        let payload = &self.buffer.as_slice()[frame_start..][payload_range];
        debug_assert_eq!(payload.as_ptr() as usize % FRAME_ALIGNMENT_BYTES, 0);
        Ok(Some(Frame {
            number,
            stream_offset,
            kind,
            flags,
            payload,
        }))
    }

    fn fail<T>(&mut self, error: FrameError) -> Result<T, FrameError> {
        self.failed = Some(error.clone());
        Err(error)
    }
}

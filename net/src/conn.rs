//! A connection between two nodes: TCP through glommio (io_uring), opened by
//! the mutual handshake of [`crate::handshake`], then frames both ways.
//!
//! - Nothing a peer sends is read as a frame before it has proven it holds
//!   the secret: the handshake messages have fixed sizes and are read with
//!   `read_exact`, so an unauthenticated peer makes this side buffer at most
//!   [`HANDSHAKE_BYTES_MAX`] bytes, and the handshake must end within
//!   `handshake_timeout`.
//! - After it, a frame whose length is over `frame_bytes_max` is an error as
//!   soon as its length field is read, before its payload is buffered; the
//!   decoder never holds more than `frame_bytes_max` bytes
//!   ([`FrameDecoder`]), and bytes read from the socket wait in one read
//!   chunk of 64 KiB until the decoder takes them.
//! - [`accept`] authenticates one accepted stream: a node spawns it per
//!   connection, so a peer that stays silent holds up only its own (until
//!   `handshake_timeout`).
//! - [`Connection::send`] is not cancel-safe: a call dropped while it
//!   waits may have written part of a frame; close the connection then.
//!   [`Connection::recv`] is: it keeps what it read in the connection, and
//!   glommio's non-buffered stream reads are readiness-based (the bytes are
//!   taken by the `recv` system call of the poll that returns them), so a
//!   call dropped while pending took nothing. The same holds of
//!   [`Connection::poll_read_more`] and [`Connection::poll_write_some`],
//!   which `net::session` races against each other and its doorbell.
//! - Frames after the handshake carry a crc32c, except a session's link
//!   frames, which [`crate::link`] seals with the session key
//!   ([`Peer::session`]) and flags sealed, with no crc; a connection takes
//!   sealed frames only once a session serves it
//!   ([`Connection::allow_sealed_frames`]). A caller that sends raw frames
//!   with [`Connection::send`] gets no such check: an attacker on the path
//!   could inject them.
//! - A broken frame (bad crc, reserved bits, flagged sealed where not
//!   allowed) ends the connection: the stream cannot be resynchronized.
//! - [`Connection::send`] writes a frame whole before it returns: a sender
//!   waits for the socket (TCP's own flow control), so nothing queues
//!   without bound here.
//! - Heartbeats are frames of kind [`HEARTBEAT_KIND`] with no payload, sent
//!   by whoever drives the connection; [`Connection::recv`] passes them on
//!   like any frame (the caller decides when a peer is lost).

use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::frame::{encode_frame, Frame, FrameConfig, FrameDecoder, FrameError};
use crate::handshake::{
    client_hello, server_challenge, HandshakeError, Identity, Peer, CHALLENGE_BYTES,
    HANDSHAKE_BYTES_MAX, HELLO_BYTES, PROOF_BYTES,
};

/// The frame kind of a heartbeat (no payload).
pub const HEARTBEAT_KIND: u8 = 0;

/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// The whole handshake must end within this, or the connection is
    /// refused.
    pub handshake_timeout: Duration,
    pub frame: FrameConfig,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            handshake_timeout: Duration::from_secs(5),
            frame: FrameConfig::default(),
        }
    }
}

/// Why a connection could not be opened or went on no longer.
#[derive(Debug)]
pub enum ConnError {
    Io(std::io::Error),
    /// The peer was refused at the handshake (or refused this node).
    Handshake(HandshakeError),
    /// The handshake did not end within `handshake_timeout`.
    HandshakeTimeout,
    Frame(FrameError),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "{e}"),
            ConnError::Handshake(e) => write!(f, "{e}"),
            ConnError::HandshakeTimeout => write!(f, "the handshake did not end in time"),
            ConnError::Frame(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConnError {}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl From<glommio::GlommioError<()>> for ConnError {
    fn from(e: glommio::GlommioError<()>) -> Self {
        ConnError::Io(e.into())
    }
}

impl From<FrameError> for ConnError {
    fn from(e: FrameError) -> Self {
        ConnError::Frame(e)
    }
}

/// An authenticated connection to a peer.
pub struct Connection {
    stream: TcpStream,
    peer: Peer,
    peer_addr: Option<SocketAddr>,
    config: FrameConfig,
    decoder: FrameDecoder,
    /// Bytes read from the socket that the decoder could not take yet.
    unread: Vec<u8>,
    unread_start: usize,
    /// Where the socket is read into (`READ_CHUNK_BYTES`).
    chunk: Vec<u8>,
    out: Vec<u8>,
}

/// 32 bytes from the kernel's random source: a handshake nonce.
fn nonce() -> Result<[u8; 32], ConnError> {
    let mut nonce = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

async fn within<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    let mut work = std::pin::pin!(work);
    let timed = glommio::timer::timeout(timeout, async { Ok(work.as_mut().await) }).await;
    match timed {
        Ok(result) => result,
        Err(_) => Err(ConnError::HandshakeTimeout),
    }
}

/// Connect to `addr` as `identity` and authenticate both ways.
pub async fn connect(
    addr: SocketAddr,
    identity: &Identity,
    config: &ConnConfig,
) -> Result<Connection, ConnError> {
    let nonce = nonce()?;
    within(config.handshake_timeout, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (state, hello) = client_hello(identity, nonce);
        stream.write_all(&hello).await?;
        let mut challenge = [0u8; CHALLENGE_BYTES];
        stream.read_exact(&mut challenge).await?;
        let (proof, peer) = state
            .on_challenge(&challenge)
            .map_err(ConnError::Handshake)?;
        stream.write_all(&proof).await?;
        Ok(Connection::new(stream, peer, Some(addr), config))
    })
    .await
}

/// Authenticate a stream a listener accepted. A peer that fails the
/// handshake is an error naming its address (the caller logs the refusal).
pub async fn accept(
    stream: TcpStream,
    identity: &Identity,
    config: &ConnConfig,
) -> Result<Connection, (Option<SocketAddr>, ConnError)> {
    let addr = stream.peer_addr().ok();
    let nonce = nonce().map_err(|e| (addr, e))?;
    within(config.handshake_timeout, async move {
        let mut stream = stream;
        stream.set_nodelay(true)?;
        let mut hello = [0u8; HELLO_BYTES];
        stream.read_exact(&mut hello).await?;
        let (state, challenge) =
            server_challenge(identity, &hello, nonce).map_err(ConnError::Handshake)?;
        stream.write_all(&challenge).await?;
        let mut proof = [0u8; PROOF_BYTES];
        stream.read_exact(&mut proof).await?;
        let peer = state.on_proof(&proof).map_err(ConnError::Handshake)?;
        Ok(Connection::new(stream, peer, addr, config))
    })
    .await
    .map_err(|e| (addr, e))
}

const _: () = assert!(HELLO_BYTES <= HANDSHAKE_BYTES_MAX && PROOF_BYTES <= HANDSHAKE_BYTES_MAX);

impl Connection {
    fn new(
        stream: TcpStream,
        peer: Peer,
        peer_addr: Option<SocketAddr>,
        config: &ConnConfig,
    ) -> Self {
        Connection {
            stream,
            peer,
            peer_addr,
            config: config.frame,
            decoder: FrameDecoder::new(config.frame),
            unread: Vec::new(),
            unread_start: 0,
            chunk: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Take frames flagged `frame::FLAG_SEALED` (no crc) from now on: for
    /// a caller that authenticates every frame's payload itself (a
    /// session's link does).
    pub fn allow_sealed_frames(&mut self) {
        self.decoder.allow_sealed();
    }

    /// The authenticated peer.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// Send one frame; returns once it is written to the socket.
    pub async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ConnError> {
        self.out.clear();
        encode_frame(&self.config, kind, payload, &mut self.out)?;
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// A heartbeat frame.
    pub async fn heartbeat(&mut self) -> Result<(), ConnError> {
        self.send(HEARTBEAT_KIND, &[]).await
    }

    /// The next frame, or `None` when the peer closed the connection between
    /// frames. A connection closed inside a frame, or a broken frame, is an
    /// error.
    pub async fn recv(&mut self) -> Result<Option<Frame<'_>>, ConnError> {
        while !self.take_unread()? {
            let read = futures_lite::future::poll_fn(|cx| self.poll_read_more(cx)).await?;
            if read == 0 {
                return Ok(None);
            }
        }
        Ok(Some(self.decoder.next_frame()?.expect("a frame is ready")))
    }

    /// The next frame among the bytes read already, without reading the
    /// socket: `None` when they hold no whole frame.
    pub fn next_buffered(&mut self) -> Result<Option<Frame<'_>>, ConnError> {
        if !self.take_unread()? {
            return Ok(None);
        }
        Ok(self.decoder.next_frame()?)
    }

    /// Hand the bytes read before to the decoder; whether a whole frame is
    /// ready.
    fn take_unread(&mut self) -> Result<bool, ConnError> {
        if self.unread_start < self.unread.len() {
            let taken = self.decoder.push(&self.unread[self.unread_start..]);
            self.unread_start += taken;
        }
        if self.decoder.frame_ready() {
            return Ok(true);
        }
        if self.unread_start < self.unread.len() {
            // A decoder short of a whole frame always has room for more (it
            // holds up to one frame's bound): not reached.
            return Err(ConnError::Io(std::io::Error::other(
                "the frame decoder took no bytes while short of a frame",
            )));
        }
        Ok(false)
    }

    /// Poll for more bytes from the socket once those read before are all
    /// taken by the decoder ([`Connection::next_buffered`]): how many came,
    /// 0 when the peer closed between frames (closed inside a frame is an
    /// error). A poll that returns `Pending` has taken nothing (see the
    /// module header), so a caller may race it.
    pub fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, ConnError>> {
        if self.unread_start < self.unread.len() {
            return Poll::Ready(Ok(self.unread.len() - self.unread_start));
        }
        if self.chunk.len() < READ_CHUNK_BYTES {
            self.chunk.resize(READ_CHUNK_BYTES, 0);
        }
        let read = match Pin::new(&mut self.stream).poll_read(cx, &mut self.chunk) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Ready(Ok(read)) => read,
        };
        // The bytes become the unread ones; the old buffer is the next chunk.
        std::mem::swap(&mut self.chunk, &mut self.unread);
        self.unread.truncate(read);
        self.unread_start = 0;
        if read == 0 && self.decoder.buffered_bytes() > 0 {
            let partial = self.decoder.buffered_bytes();
            return Poll::Ready(Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the peer closed the connection inside a frame ({partial} bytes of it read)"
                ),
            ))));
        }
        Poll::Ready(Ok(read))
    }

    /// Poll to write some of `bytes` (encoded frames): how many were
    /// written. A poll that returns `Pending` wrote nothing, so a caller may
    /// race it and offer the rest again later.
    pub fn poll_write_some(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<Result<usize, ConnError>> {
        Pin::new(&mut self.stream)
            .poll_write(cx, bytes)
            .map_err(ConnError::Io)
    }

    /// Close the connection (both directions).
    pub async fn close(mut self) -> Result<(), ConnError> {
        self.stream.close().await?;
        Ok(())
    }
}

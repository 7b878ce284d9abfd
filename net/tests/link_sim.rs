//! Deterministic simulation of two nodes' link over a faulty network: the
//! real `Link`, `FrameDecoder` and frame encoder, driven step by step
//! (100 µs) with a seeded generator through
//!
//! - delay: each chunk a side writes arrives 0-2 ms later, sometimes 30 ms
//!   (in order within a connection, as over TCP);
//! - loss: the connection breaks at random, and what was in flight on it
//!   is lost both ways;
//! - partitions: for 5-200 ms no connection can be made;
//! - reordering: frames recorded on this and earlier connections are
//!   injected into the current one (replays, and frames under another
//!   session's key);
//! - forgery and corruption: a frame's body changed (link frames carry no
//!   crc: only the tag can tell), or a bit flipped on the wire;
//! - slow receivers: each side takes its messages at its own pace, with
//!   long pauses, so credit runs out.
//!
//! After each step: no inbox over its window, no send buffer over its
//! bound, every message taken is the next one of its sender, whole; a
//! connection nothing was injected into never has a frame refused. At the
//! end every message has been taken, exactly once, in order. Restarts (a
//! new incarnation drops messages by design) are tested apart, below. Over many
//! seeds; `DIRIGO_LINK_SIM_SEEDS` sets how many (scripts/fuzz runs more).

use std::collections::VecDeque;

use dirigo_net::frame::{encode_frame, FrameConfig, FrameDecoder};
use dirigo_net::handshake::SessionKey;
use dirigo_net::link::{
    Backoff, Link, LinkConfig, LinkError, LinkStats, Role, SendError, DATA_KIND,
};

const STEP_NS: u64 = 100_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

/// The body of message `index` of `side`: its index, then filler whose
/// length and bytes follow from both (so a wrong, short or mixed-up body
/// shows).
fn body(side: usize, index: u64) -> Vec<u8> {
    let mut rng = Rng(index.wrapping_mul(31).wrapping_add(side as u64));
    let len = rng.below(300) as usize;
    let mut body = index.to_le_bytes().to_vec();
    body.extend((0..len).map(|_| rng.next() as u8));
    body
}

/// One node: its link and its application.
struct Side {
    link: Link,
    role: Role,
    /// Messages the application queued so far, and will queue in all.
    queued: u64,
    total: u64,
    /// Messages it took from the peer.
    taken: u64,
    /// The application takes nothing until then (a slow consumer).
    paused_until_ns: u64,
    decoder: FrameDecoder,
}

/// One direction of a connection: chunks in flight, each with when it lands.
type Pipe = VecDeque<(u64, Vec<u8>)>;

struct Net {
    up: bool,
    pipes: [Pipe; 2],
    partitioned_until_ns: u64,
    connect_at_ns: u64,
    backoff: Backoff,
    /// Frames seen on earlier connections (for stale injection), bounded.
    recorded: VecDeque<Vec<u8>>,
    key_counter: u64,
    /// Something was injected into the current connection: a refused frame
    /// is expected only then.
    injected: bool,
}

#[derive(Default, Debug)]
struct Faults {
    breaks: u64,
    partitions: u64,
    stale: u64,
    forged: u64,
    flipped: u64,
    dead: u64,
}

fn config() -> LinkConfig {
    LinkConfig {
        window_msgs: 16,
        send_buffer_msgs: 48,
        heartbeat_ns: 5_000_000,
        ack_delay_ns: 1_000_000,
        dead_after_ns: 25_000_000,
        frame: FrameConfig::new(4096).expect("a valid bound"),
    }
}

/// A decoder as a session's connection has: link frames are sealed.
fn sealed_decoder() -> FrameDecoder {
    let mut decoder = FrameDecoder::new(config().frame);
    decoder.allow_sealed();
    decoder
}

/// A frame of `kind` carrying `payload` as a link writes it (the frame
/// module's header): flagged `FLAG_SEALED`, its crc field 0.
fn sealed_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_frame(&config().frame, kind, payload, &mut bytes).unwrap();
    bytes[4..8].fill(0);
    bytes[9] = dirigo_net::frame::FLAG_SEALED;
    bytes
}

fn break_connection(net: &mut Net, sides: &mut [Side; 2], now_ns: u64) {
    net.up = false;
    net.pipes = [VecDeque::new(), VecDeque::new()];
    for side in sides.iter_mut() {
        side.link.disconnected();
        side.decoder = sealed_decoder();
    }
    net.connect_at_ns = now_ns + net.backoff.next_delay_ns();
}

/// Deliver what landed on `to` by now; false if the connection broke.
fn deliver(net: &mut Net, sides: &mut [Side; 2], to: usize, now_ns: u64, rng: &mut Rng) -> bool {
    while net.pipes[1 - to]
        .front()
        .is_some_and(|(at, _)| *at <= now_ns)
    {
        let (_, bytes) = net.pipes[1 - to].pop_front().expect("checked");
        // In pieces of any size, as a socket reads them.
        let mut at = 0;
        while at < bytes.len() {
            let piece = (1 + rng.below(700) as usize).min(bytes.len() - at);
            let side = &mut sides[to];
            let mut offered = &bytes[at..at + piece];
            while !offered.is_empty() {
                let took = side.decoder.push(offered);
                offered = &offered[took..];
                loop {
                    match side.decoder.next_frame() {
                        Ok(Some(frame)) => {
                            if let Err(e) = side.link.on_frame(&frame, now_ns) {
                                assert!(net.injected, "an honest connection refused a frame: {e}");
                                return false;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => return false, // a corrupted frame: crc or length
                    }
                }
                if took == 0 && !offered.is_empty() {
                    return false;
                }
            }
            at += piece;
        }
    }
    true
}

/// `chunk` with its first frame's payload changed (a link frame has no
/// crc to make good again: its tag is what must catch it); `None` if it
/// was broken already (a flipped bit).
fn forge(chunk: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let mut decoder = sealed_decoder();
    decoder.push(chunk);
    let frame = decoder.next_frame().ok()??;
    let (kind, mut payload) = (frame.kind, frame.payload.to_vec());
    let at = if payload.len() > 64 {
        64 + rng.below(payload.len() as u64 - 64) as usize
    } else {
        16 // the credit field
    };
    payload[at] = payload[at].wrapping_add(1 + rng.below(255) as u8);
    let mut forged = sealed_frame(kind, &payload);
    let first = dirigo_net::frame_bytes(frame.payload.len());
    forged.extend_from_slice(&chunk[first..]);
    Some(forged)
}

/// One seed's run; the links' stats and the faults met.
fn simulate(seed: u64, messages: u64) -> ([LinkStats; 2], Faults) {
    let mut rng = Rng(seed);
    // Each seed has its own mix: how often the connection breaks, how
    // often partitions and injections come.
    let break_ppm = [0, 200, 2_000][rng.below(3) as usize];
    let partition_ppm = [0, 50, 500][rng.below(3) as usize];
    let inject_ppm = [0, 300, 3_000][rng.below(3) as usize];
    let spike_ppm = [0, 1_000, 10_000][rng.below(3) as usize];
    let new_side = |role: Role, incarnation: u64| Side {
        link: Link::new(config(), incarnation),
        role,
        queued: 0,
        total: messages,
        taken: 0,
        paused_until_ns: 0,
        decoder: sealed_decoder(),
    };
    let mut sides = [
        new_side(Role::Client, (seed << 1) + 1),
        new_side(Role::Server, (seed << 1) + 2),
    ];
    let mut net = Net {
        up: false,
        pipes: [VecDeque::new(), VecDeque::new()],
        partitioned_until_ns: 0,
        connect_at_ns: 0,
        backoff: Backoff::new(1_000_000, 50_000_000, seed),
        recorded: VecDeque::new(),
        key_counter: seed << 20,
        injected: false,
    };
    let mut faults = Faults::default();
    let mut last_landing = [0u64; 2];
    let limit_steps = 2_000_000;
    for step in 0..limit_steps {
        let now_ns = step * STEP_NS;
        // Connect, unless partitioned.
        if !net.up && now_ns >= net.connect_at_ns {
            if now_ns < net.partitioned_until_ns {
                net.connect_at_ns = now_ns + net.backoff.next_delay_ns();
            } else {
                net.key_counter += 1;
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&net.key_counter.to_le_bytes());
                key[8..16].copy_from_slice(&rng.next().to_le_bytes());
                for side in sides.iter_mut() {
                    let role = side.role;
                    side.link.connected(SessionKey(key), role, now_ns);
                }
                net.up = true;
                net.injected = false;
                last_landing = [now_ns; 2];
            }
        }
        // Faults.
        if net.up && rng.chance(break_ppm) {
            faults.breaks += 1;
            break_connection(&mut net, &mut sides, now_ns);
        }
        if rng.chance(partition_ppm) {
            faults.partitions += 1;
            net.partitioned_until_ns = now_ns + 5_000_000 + rng.below(195_000_000);
            if net.up {
                break_connection(&mut net, &mut sides, now_ns);
            }
        }
        // Applications queue messages as fast as their links take them.
        for (i, side) in sides.iter_mut().enumerate() {
            while side.queued < side.total {
                match side.link.send(7, body(i, side.queued + 1)) {
                    Ok(_) => side.queued += 1,
                    Err(SendError::Full) => break,
                    Err(e) => panic!("seed {seed}: {e:?}"),
                }
            }
            assert!(side.link.unacked() <= config().send_buffer_msgs as usize);
        }
        // Transmit.
        if net.up {
            for i in 0..2 {
                let mut out = Vec::new();
                if sides[i].link.poll_transmit(now_ns, &mut out, 8192) == 0 {
                    continue;
                }
                if net.recorded.len() < 64 || rng.chance(100_000) {
                    if net.recorded.len() >= 64 {
                        net.recorded.pop_front();
                    }
                    net.recorded.push_back(out.clone());
                }
                let mut delay = rng.below(2_000_000);
                if rng.chance(spike_ppm) {
                    delay += 30_000_000;
                }
                let landing = (now_ns + delay).max(last_landing[i]);
                last_landing[i] = landing;
                net.pipes[i].push_back((landing, out));
            }
            // Injections into the current connection.
            if rng.chance(inject_ppm) {
                net.injected = true;
                let to = rng.below(2) as usize;
                match rng.below(3) {
                    0 if !net.recorded.is_empty() => {
                        faults.stale += 1;
                        let pick = rng.below(net.recorded.len() as u64) as usize;
                        let stale = net.recorded[pick].clone();
                        net.pipes[1 - to].push_back((last_landing[1 - to], stale));
                    }
                    1 => {
                        // An on-path forger without the key: the first
                        // frame of the last chunk in flight gets a changed
                        // body (or, with none, a larger credit); a link
                        // frame has no crc, so only the tag can tell.
                        if let Some((_, bytes)) = net.pipes[1 - to].back_mut() {
                            if let Some(forged) = forge(bytes, &mut rng) {
                                faults.forged += 1;
                                *bytes = forged;
                            }
                        }
                    }
                    _ => {
                        if let Some((_, bytes)) = net.pipes[1 - to].back_mut() {
                            faults.flipped += 1;
                            let at = rng.below(bytes.len() as u64) as usize;
                            bytes[at] ^= 1 << rng.below(8);
                        }
                    }
                }
            }
            // Deliver.
            for to in 0..2 {
                if net.up && !deliver(&mut net, &mut sides, to, now_ns, &mut rng) {
                    break_connection(&mut net, &mut sides, now_ns);
                }
            }
            if net.up && sides.iter().any(|s| s.link.is_dead(now_ns)) {
                faults.dead += 1;
                break_connection(&mut net, &mut sides, now_ns);
            }
            if net.up && sides.iter().all(|s| s.link.stats().delivered > 0) {
                net.backoff.reset();
            }
        }
        // Applications take messages at their own pace.
        for (i, side) in sides.iter_mut().enumerate() {
            assert!(
                side.link.inbox_len() <= config().window_msgs as usize,
                "seed {seed}: inbox of {} over its window",
                side.link.inbox_len()
            );
            if now_ns < side.paused_until_ns {
                continue;
            }
            if rng.chance(2_000) {
                side.paused_until_ns = now_ns + rng.below(40_000_000);
                continue;
            }
            for _ in 0..rng.below(4) {
                let Some((kind, got)) = side.link.recv() else {
                    break;
                };
                side.taken += 1;
                assert_eq!(kind, 7, "seed {seed}");
                assert_eq!(
                    got,
                    body(1 - i, side.taken),
                    "seed {seed}: side {i} took a message other than number {}",
                    side.taken
                );
            }
        }
        if sides.iter().all(|s| s.taken == messages) {
            for side in &mut sides {
                assert!(
                    side.link.recv().is_none(),
                    "seed {seed}: a message past the last"
                );
            }
            return ([sides[0].link.stats(), sides[1].link.stats()], faults);
        }
    }
    panic!(
        "seed {seed}: not done after {limit_steps} steps: taken {} and {} of {messages}; {faults:?}",
        sides[0].taken, sides[1].taken
    );
}

#[test]
fn every_message_arrives_once_in_order_through_lost_connections_partitions_and_forgeries() {
    let seeds: u64 = std::env::var("DIRIGO_LINK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut totals = Faults::default();
    let (mut resent, mut refused, mut connections) = (0, 0, 0);
    for seed in 0..seeds {
        let (stats, faults) = simulate(seed, 600);
        totals.breaks += faults.breaks;
        totals.partitions += faults.partitions;
        totals.stale += faults.stale;
        totals.forged += faults.forged;
        totals.flipped += faults.flipped;
        totals.dead += faults.dead;
        for s in stats {
            resent += s.resent;
            refused += s.refused_frames;
            connections += s.connections;
            assert_eq!(s.delivered, 600, "seed {seed}: {s:?}");
            assert_eq!(s.peer_restarts, 0);
        }
    }
    eprintln!(
        "{seeds} seeds: {totals:?}; {connections} connections, {resent} messages sent again, \
         {refused} frames refused"
    );
    // The faults were met, and the link had to work for it (over enough
    // seeds to meet every kind).
    if seeds >= 100 {
        assert!(totals.breaks > 0 && totals.partitions > 0, "{totals:?}");
        assert!(
            totals.stale > 0 && totals.forged > 0 && totals.flipped > 0,
            "{totals:?}"
        );
        assert!(totals.dead > 0 && resent > 0 && refused > 0, "{totals:?}");
    }
}

/// A peer that restarts (a new incarnation) loses what it held: what it had
/// not acked is dropped and counted, numbering starts again, and the new
/// incarnation gets every message sent after.
/// Everything `from` has to send, read by `to`.
fn pass(from: &mut Link, to: &mut Link) {
    let mut out = Vec::new();
    from.poll_transmit(0, &mut out, 1 << 20);
    let mut decoder = sealed_decoder();
    assert_eq!(decoder.push(&out), out.len());
    while let Some(frame) = decoder.next_frame().unwrap() {
        to.on_frame(&frame, 0).unwrap();
    }
}

fn exchange(a: &mut Link, b: &mut Link, rounds: usize) {
    for _ in 0..rounds {
        pass(a, b);
        pass(b, a);
    }
}

fn connect(a: &mut Link, b: &mut Link, key: u8) {
    a.disconnected();
    b.disconnected();
    a.connected(SessionKey([key; 32]), Role::Client, 0);
    b.connected(SessionKey([key; 32]), Role::Server, 0);
}

/// `n` messages each way, from number `from` of each side's stream.
fn send_both(a: &mut Link, b: &mut Link, from: u64, n: u64) {
    for i in from..from + n {
        a.send(7, body(0, i)).unwrap();
        b.send(7, body(1, i)).unwrap();
    }
}

/// Take messages `from..from + n` of `side`'s stream, and nothing more.
fn take(link: &mut Link, side: usize, from: u64, n: u64) {
    for i in from..from + n {
        assert_eq!(link.recv().map(|m| m.1), Some(body(side, i)), "message {i}");
    }
    assert!(link.recv().is_none());
}

/// A peer that restarts (a new incarnation) lost what it held: what the
/// other side had not got acked, and had not taken of the old stream, is
/// dropped and counted, both streams start again from 1, and nothing of
/// the old numbering leaks into the new. Each way: the side that restarts
/// is once the server and once the client.
#[test]
fn a_restart_of_either_side_starts_new_streams_both_ways() {
    for restart_server in [true, false] {
        let mut client = Link::new(config(), 11);
        let mut server = Link::new(config(), 22);
        connect(&mut client, &mut server, 1);
        send_both(&mut client, &mut server, 1, 10);
        exchange(&mut client, &mut server, 3);
        take(&mut client, 1, 1, 10);
        take(&mut server, 0, 1, 10);
        // Five more each way are sent; neither side hears of them.
        send_both(&mut client, &mut server, 11, 5);
        let mut lost = Vec::new();
        client.poll_transmit(0, &mut lost, 1 << 20);
        server.poll_transmit(0, &mut lost, 1 << 20);
        // One side restarts and queues a message before it reconnects; the
        // other still knows its old incarnation.
        if restart_server {
            server = Link::new(config(), 33);
            server.send(7, b"new 1".to_vec()).unwrap();
        } else {
            client = Link::new(config(), 44);
            client.send(7, b"new 1".to_vec()).unwrap();
        }
        connect(&mut client, &mut server, 2);
        exchange(&mut client, &mut server, 3);
        let (survivor, restarted) = if restart_server {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        assert_eq!(survivor.stats().peer_restarts, 1);
        assert_eq!(survivor.stats().dropped_on_restart, 5);
        assert_eq!(restarted.stats().peer_restarts, 0);
        assert_eq!(survivor.recv().map(|m| m.1), Some(b"new 1".to_vec()));
        survivor.send(7, b"after 1".to_vec()).unwrap();
        exchange(&mut client, &mut server, 2);
        let (survivor, restarted) = if restart_server {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        assert_eq!(restarted.recv().map(|m| m.1), Some(b"after 1".to_vec()));
        assert!(restarted.recv().is_none() && survivor.recv().is_none());
        assert_eq!(survivor.stats().refused_frames, 0);
        assert_eq!(restarted.stats().refused_frames, 0);
    }
}

/// A resume lost with its connection (A took B's, B never got A's) is no
/// error on the next connection, and nothing is lost or repeated; also when
/// B had just restarted.
#[test]
fn a_resume_lost_with_its_connection_is_no_error_on_the_next() {
    let mut a = Link::new(config(), 11);
    let mut b = Link::new(config(), 22);
    send_both(&mut a, &mut b, 1, 3);
    connect(&mut a, &mut b, 1);
    pass(&mut b, &mut a);
    let mut lost = Vec::new();
    a.poll_transmit(0, &mut lost, 1 << 20);
    // B speaks first again: its resume still names no incarnation of A.
    connect(&mut a, &mut b, 2);
    pass(&mut b, &mut a);
    exchange(&mut a, &mut b, 3);
    take(&mut a, 1, 1, 3);
    take(&mut b, 0, 1, 3);
    let mut b = Link::new(config(), 33);
    b.send(7, body(1, 1)).unwrap();
    connect(&mut a, &mut b, 3);
    pass(&mut b, &mut a);
    a.poll_transmit(0, &mut lost, 1 << 20);
    connect(&mut a, &mut b, 4);
    pass(&mut b, &mut a);
    exchange(&mut a, &mut b, 3);
    take(&mut a, 1, 1, 1);
    assert_eq!(a.stats().peer_restarts, 1);
    assert_eq!(a.stats().refused_frames + b.stats().refused_frames, 0);
}

/// `bytes` cut into its frames, each whole.
fn frames_of(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut decoder = sealed_decoder();
    assert_eq!(decoder.push(bytes), bytes.len());
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some(frame) = decoder.next_frame().unwrap() {
        let end = at + dirigo_net::frame_bytes(frame.payload.len());
        frames.push(bytes[at..end].to_vec());
        at = end;
    }
    assert_eq!(at, bytes.len());
    frames
}

/// Hand one whole frame to `link`.
fn feed(link: &mut Link, frame: &[u8]) -> Result<(), LinkError> {
    let mut decoder = sealed_decoder();
    decoder.push(frame);
    link.on_frame(&decoder.next_frame().unwrap().unwrap(), 0)
}

/// Frames are sealed for their connection, direction and place: a body
/// never crosses the wire in clear, and a frame replayed, skipped ahead,
/// or reflected back to its sender on the same connection (where the
/// session key is right) fails its tag and takes nothing.
#[test]
fn frames_are_encrypted_and_bound_to_their_place_on_the_connection() {
    let marker = b"a body nobody on the path may read".to_vec();
    // Two messages from `a`, after both resumes; the wire's frames.
    let setup = |key: u8| {
        let mut a = Link::new(config(), 11);
        let mut b = Link::new(config(), 22);
        connect(&mut a, &mut b, key);
        exchange(&mut a, &mut b, 1);
        a.send(7, marker.clone()).unwrap();
        a.send(7, marker.clone()).unwrap();
        let mut wire = Vec::new();
        a.poll_transmit(0, &mut wire, 1 << 20);
        (a, b, wire)
    };
    let (_, mut b, wire) = setup(1);
    assert!(
        !wire.windows(marker.len()).any(|w| w == &marker[..]),
        "a body in clear on the wire"
    );
    let frames = frames_of(&wire);
    assert_eq!(frames.len(), 2);
    // Delivered as sent: both, whole.
    for frame in &frames {
        feed(&mut b, frame).unwrap();
    }
    assert_eq!(b.recv().map(|m| m.1), Some(marker.clone()));
    assert_eq!(b.recv().map(|m| m.1), Some(marker.clone()));
    // Replayed: the first frame again after it.
    let (_, mut b, wire) = setup(2);
    let frames = frames_of(&wire);
    feed(&mut b, &frames[0]).unwrap();
    assert_eq!(
        feed(&mut b, &frames[0]),
        Err(LinkError::BadTag { kind: DATA_KIND })
    );
    // Skipped ahead: the second frame first.
    let (_, mut b, wire) = setup(3);
    let frames = frames_of(&wire);
    assert_eq!(
        feed(&mut b, &frames[1]),
        Err(LinkError::BadTag { kind: DATA_KIND })
    );
    assert!(b.recv().is_none());
    // Reflected: `a` is handed its own first data frame, which has the
    // number `a` expects next from `b` (each side sent one resume): only
    // the role tells them apart.
    let (mut a, _, wire) = setup(4);
    let frames = frames_of(&wire);
    assert_eq!(
        feed(&mut a, &frames[0]),
        Err(LinkError::BadTag { kind: DATA_KIND })
    );
    assert!(a.recv().is_none());
}

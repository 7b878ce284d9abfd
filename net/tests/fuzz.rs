//! Property tests of what a peer can send before and after the handshake:
//! the handshake decoders and the frame decoder take any bytes without a
//! panic and without buffering past their bounds, and no change to a
//! handshake message in flight lets an exchange authenticate; valid frames
//! with bytes changed fail cleanly, the frames before the change intact;
//! a link takes any frame after the handshake without a panic, delivering
//! nothing from a frame whose tag it cannot verify.
//!
//! CI runs proptest's default number of cases per property;
//! `scripts/fuzz` runs a million each (`PROPTEST_CASES`).

use dirigo_net::handshake::SessionKey;
use dirigo_net::handshake::{
    client_hello, server_challenge, Identity, CHALLENGE_BYTES, HANDSHAKE_BYTES_MAX, HELLO_BYTES,
    PROOF_BYTES,
};
use dirigo_net::link::{Link, LinkConfig, Role};
use dirigo_net::{encode_frame, FrameConfig, FrameDecoder};
use proptest::prelude::*;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

const SECRET: &[u8] = b"a secret of sixteen bytes or more";

fn client() -> Identity {
    Identity::new("c", 1, SECRET).unwrap()
}

fn server() -> Identity {
    Identity::new("c", 2, SECRET).unwrap()
}

proptest! {
    /// Any bytes as a hello, a challenge or a proof: an error or (for a
    /// well-formed hello) a challenge, never a panic.
    #[test]
    fn handshake_decoders_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..=HANDSHAKE_BYTES_MAX + 8)) {
        let _ = server_challenge(&server(), &bytes, [3; 32]);
        let (state, _) = client_hello(&client(), [4; 32]);
        prop_assert!(state.on_challenge(&bytes).is_err(), "random bytes do not carry the server's proof");
        let (_, hello) = client_hello(&client(), [4; 32]);
        let (state, _) = server_challenge(&server(), &hello, [3; 32]).unwrap();
        prop_assert!(state.on_proof(&bytes).is_err(), "random bytes do not carry the client's proof");
    }

    /// A byte of any handshake message changed in flight: the exchange does
    /// not authenticate on the side that reads it, or on the other side.
    #[test]
    fn a_changed_handshake_byte_never_authenticates(
        message in 0usize..3,
        at in 0usize..CHALLENGE_BYTES,
        flip in 1u8..=255,
    ) {
        let (client_state, mut hello) = client_hello(&client(), [4; 32]);
        if message == 0 {
            let i = at % HELLO_BYTES;
            hello[i] ^= flip;
        }
        let Ok((server_state, mut challenge)) = server_challenge(&server(), &hello, [3; 32]) else {
            return Ok(()); // refused at the hello
        };
        if message == 1 {
            challenge[at % CHALLENGE_BYTES] ^= flip;
        }
        let Ok((mut proof, _)) = client_state.on_challenge(&challenge) else {
            return Ok(()); // refused at the challenge
        };
        prop_assert!(message == 2, "a changed hello or challenge passed the client's check");
        proof[at % PROOF_BYTES] ^= flip;
        prop_assert!(server_state.on_proof(&proof).is_err());
    }

    /// Any bytes in any chunks as frames: errors or frames, never a panic,
    /// and the decoder's buffer never passes its bound.
    #[test]
    fn the_frame_decoder_takes_any_bytes_within_its_bound(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
        headers in proptest::collection::vec((0u32..2048, any::<u8>()), 0..4),
    ) {
        let config = FrameConfig::new(1024).unwrap();
        let mut decoder = FrameDecoder::new(config);
        // Some chunks start with a plausible header (a length near the bound).
        let mut input: Vec<Vec<u8>> = chunks;
        for (i, (length, kind)) in headers.into_iter().enumerate() {
            let mut header = length.to_le_bytes().to_vec();
            header.extend_from_slice(&[0, 0, 0, 0, kind, 0, 0, 0, 0, 0, 0, 0]);
            let at = i.min(input.len());
            input.insert(at, header);
        }
        'feed: for chunk in &input {
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let taken = decoder.push(rest);
                prop_assert!(decoder.buffer_capacity_bytes() <= 1024);
                rest = &rest[taken..];
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => prop_assert!(frame.payload.len() <= 1024 - 16),
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                if taken == 0 && !rest.is_empty() {
                    break 'feed; // failed: takes nothing more
                }
            }
        }
    }

    /// Valid frames (random kinds and payloads) with some bytes changed,
    /// fed in random chunks: the frames before the first change come out
    /// whole and in order, nothing panics, and `frame_ready` says exactly
    /// when `next_frame` has something (a frame or an error) to return.
    #[test]
    fn changed_frames_fail_cleanly_and_frame_ready_agrees_with_next_frame(
        frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..600)), 1..8),
        changes in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..3),
        cuts in proptest::collection::vec(1usize..200, 1..30),
    ) {
        let config = FrameConfig::new(1024).unwrap();
        let mut stream = Vec::new();
        let mut sent = Vec::new();
        for (kind, payload) in &frames {
            if encode_frame(&config, *kind, payload, &mut stream).is_ok() {
                sent.push((*kind, payload.clone()));
            }
        }
        let first_change = changes.iter().map(|&(at, _)| at % stream.len().max(1)).min();
        for &(at, flip) in &changes {
            if !stream.is_empty() {
                let i = at % stream.len();
                stream[i] ^= flip;
            }
        }
        let mut decoder = FrameDecoder::new(config);
        let mut got = Vec::new();
        let mut failed = false;
        let mut rest = &stream[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() && !failed {
            let n = (*cut.next().unwrap()).min(rest.len());
            let taken = decoder.push(&rest[..n]);
            rest = &rest[taken..];
            loop {
                let ready = decoder.frame_ready();
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        prop_assert!(ready);
                        got.push((frame.kind, frame.payload.to_vec()));
                    }
                    Ok(None) => {
                        prop_assert!(!ready);
                        break;
                    }
                    Err(_) => {
                        prop_assert!(ready);
                        failed = true;
                        break;
                    }
                }
            }
            if taken == 0 && !failed {
                prop_assert!(false, "a decoder short of a frame took no bytes");
            }
        }
        // Frames wholly before the first changed byte come out unchanged.
        let mut offset = 0;
        for (i, (kind, payload)) in sent.iter().enumerate() {
            let end = offset + dirigo_net::frame_bytes(payload.len());
            if first_change.is_none_or(|c| end <= c) {
                prop_assert_eq!(got.get(i), Some(&(*kind, payload.clone())));
            }
            offset = end;
        }
        if first_change.is_none() {
            prop_assert_eq!(got.len(), sent.len());
        }
    }

    /// Any frame kind and payload handed to a connected link, resumed or
    /// not: an error (the tag cannot verify without the session key), never
    /// a panic, and nothing delivered.
    #[test]
    fn a_link_takes_any_frame_without_a_panic(
        resumed in any::<bool>(),
        frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..200), any::<bool>()), 1..4),
    ) {
        let config = LinkConfig::default();
        let mut link = Link::new(config, 5);
        link.connected(SessionKey([9; 32]), Role::Server, 0);
        if resumed {
            // A real resume from the peer first.
            let mut peer = Link::new(config, 6);
            peer.connected(SessionKey([9; 32]), Role::Client, 0);
            let mut out = Vec::new();
            peer.poll_transmit(0, &mut out, 1 << 16);
            let mut decoder = FrameDecoder::new(config.frame);
            decoder.allow_sealed();
            decoder.push(&out);
            let frame = decoder.next_frame().unwrap().unwrap();
            prop_assert!(link.on_frame(&frame, 0).is_ok());
        }
        for (kind, payload, sealed) in frames {
            let mut bytes = Vec::new();
            encode_frame(&config.frame, kind, &payload, &mut bytes).unwrap();
            if sealed {
                // As a link writes them: flagged sealed, no crc.
                bytes[4..8].fill(0);
                bytes[9] = dirigo_net::frame::FLAG_SEALED;
            }
            let mut decoder = FrameDecoder::new(config.frame);
            decoder.allow_sealed();
            decoder.push(&bytes);
            let frame = decoder.next_frame().unwrap().unwrap();
            prop_assert!(link.on_frame(&frame, 0).is_err(), "an untagged frame was taken");
            prop_assert!(link.recv().is_none());
            link.connected(SessionKey([9; 32]), Role::Server, 0);
        }
    }

    /// Frames with a valid tag (a peer holding the session key, or a bug in
    /// it) and any header fields, kinds and bodies, after a valid resume:
    /// never a panic, the inbox never over its window, at most one message
    /// delivered per frame.
    #[test]
    fn a_link_takes_any_tagged_frame_without_a_panic_or_overflow(
        frames in proptest::collection::vec(
            (1u8..=4, [any::<u64>(); 4], 0u8..=3, proptest::collection::vec(any::<u8>(), 0..40)),
            1..32,
        ),
    ) {
        let config = LinkConfig { window_msgs: 4, ..LinkConfig::default() };
        let key = SessionKey([5; 32]);
        let mut link = Link::new(config, 5);
        // Frames the peer sealed on the current connection.
        let mut sealed = 0;
        let connect = |link: &mut Link, sealed: &mut u64| {
            link.connected(key, Role::Server, 0);
            *sealed = 0;
            let resume = tagged(&config, &key, sealed, 3, [0, 0, 4, 6], &[]);
            take(&config, link, &resume).expect("a valid resume");
        };
        connect(&mut link, &mut sealed);
        for (kind, mut fields, near, body) in frames {
            let before = link.stats().delivered;
            // Mostly numbers near where the link stands, sometimes anything.
            if near > 0 {
                fields[0] = before + u64::from(near) - 1;
                fields[1] = 0;
                fields[3] = 6;
            }
            let frame = tagged(&config, &key, &mut sealed, kind, fields, &body);
            if take(&config, &mut link, &frame).is_err() {
                connect(&mut link, &mut sealed);
            }
            prop_assert!(link.inbox_len() <= 4);
            prop_assert!(link.stats().delivered <= before + 1);
            if link.inbox_len() == 4 {
                while link.recv().is_some() {}
            }
        }
    }
}

/// A link frame of `kind` with these header fields and body, sealed with
/// `key` as the client's frame number `sealed` (counted up) on its
/// connection: AES-128-GCM under the key's first 16 bytes, the nonce the
/// client's role (0) and that number, the associated data the kind and the 48 bytes of fields, the body
/// encrypted, the frame flagged sealed with no crc (written here from the
/// link's and the frame's module headers, not their code).
fn tagged(
    config: &LinkConfig,
    key: &SessionKey,
    sealed: &mut u64,
    kind: u8,
    fields: [u64; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut payload = Vec::new();
    for field in fields {
        payload.extend_from_slice(&field.to_le_bytes());
    }
    payload.resize(48, 0);
    let mut aad = vec![kind];
    aad.extend_from_slice(&payload);
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&sealed.to_le_bytes());
    *sealed += 1;
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key.0[..16]).unwrap());
    let mut sealed_body = body.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut sealed_body,
        )
        .unwrap();
    payload.extend_from_slice(tag.as_ref());
    payload.extend_from_slice(&sealed_body);
    let mut bytes = Vec::new();
    encode_frame(&config.frame, kind, &payload, &mut bytes).unwrap();
    bytes[4..8].fill(0);
    bytes[9] = dirigo_net::frame::FLAG_SEALED;
    bytes
}

/// Decode one frame from `bytes` and hand it to `link`.
fn take(
    config: &LinkConfig,
    link: &mut Link,
    bytes: &[u8],
) -> Result<(), dirigo_net::link::LinkError> {
    let mut decoder = FrameDecoder::new(config.frame);
    decoder.allow_sealed();
    decoder.push(bytes);
    let frame = decoder.next_frame().unwrap().unwrap();
    link.on_frame(&frame, 0)
}

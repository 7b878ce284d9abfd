//! Frames and codec through the public API only: round trip through random
//! chunking, corruption, truncation, oversize lengths, reserved bits, the
//! buffer bound, and payloads that pass the crc but are not valid archives.

use dirigo_net::{
    access_frame, encode_frame, frame_bytes, to_frame, FrameConfig, FrameDecoder, FrameError,
    FRAME_ALIGNMENT_BYTES, FRAME_HEADER_BYTES,
};

#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
struct Batch {
    seq: u64,
    keys: Vec<u64>,
    names: Vec<String>,
}

const BATCH_KIND: u8 = 3;

/// xorshift64*: enough randomness for chunk sizes, and a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

fn batch(rng: &mut Rng, seq: u64) -> Batch {
    let keys = (0..rng.below(200)).map(|_| rng.next()).collect();
    let names = (0..rng.below(20))
        .map(|i| format!("name-{seq}-{i}-{}", "x".repeat(rng.below(40) as usize)))
        .collect();
    Batch { seq, keys, names }
}

fn assert_equal(archived: &ArchivedBatch, expected: &Batch) {
    assert_eq!(archived.seq, expected.seq);
    assert_eq!(archived.keys.len(), expected.keys.len());
    for (a, e) in archived.keys.iter().zip(&expected.keys) {
        assert_eq!(*a, *e);
    }
    assert_eq!(archived.names.len(), expected.names.len());
    for (a, e) in archived.names.iter().zip(&expected.names) {
        assert_eq!(a.as_str(), e);
    }
}

/// Feeds `wire` to a decoder in chunks of `chunk_bytes_max` or less (random
/// when `rng` is given) and returns the decoded (kind, payload) pairs,
/// checking frame numbers, offsets and payload alignment on the way.
fn decode_all(
    config: FrameConfig,
    wire: &[u8],
    mut rng: Option<&mut Rng>,
    chunk_bytes_max: usize,
    mut on_frame: impl FnMut(&dirigo_net::Frame<'_>),
) -> Result<u64, FrameError> {
    let mut decoder = FrameDecoder::new(config);
    let mut input = wire;
    let mut frames = 0;
    let mut expected_offset = 0u64;
    loop {
        while let Some(frame) = decoder.next_frame()? {
            assert_eq!(frame.number, frames);
            assert_eq!(frame.stream_offset, expected_offset);
            assert_eq!(frame.payload.as_ptr() as usize % FRAME_ALIGNMENT_BYTES, 0);
            expected_offset += frame_bytes(frame.payload.len()) as u64;
            frames += 1;
            on_frame(&frame);
        }
        assert!(decoder.buffer_capacity_bytes() <= config.frame_bytes_max());
        if input.is_empty() {
            return Ok(frames);
        }
        let chunk_bytes = match rng.as_deref_mut() {
            Some(rng) => 1 + rng.below(chunk_bytes_max as u64) as usize,
            None => chunk_bytes_max,
        };
        let taken = decoder.push(&input[..chunk_bytes.min(input.len())]);
        input = &input[taken..];
    }
}

#[test]
fn batches_round_trip_through_random_chunking() {
    let config = FrameConfig::default();
    for seed in 1..=20u64 {
        let mut rng = Rng(seed);
        let batches: Vec<Batch> = (0..30).map(|seq| batch(&mut rng, seq)).collect();
        let mut wire = Vec::new();
        for batch in &batches {
            to_frame(&config, BATCH_KIND, batch, &mut wire).unwrap();
            assert_eq!(wire.len() % FRAME_ALIGNMENT_BYTES, 0);
        }
        let chunk_bytes_max = [1, 7, 64, 1000, 100_000][seed as usize % 5];
        let mut seen = 0;
        let frames = decode_all(config, &wire, Some(&mut rng), chunk_bytes_max, |frame| {
            assert_eq!(frame.kind, BATCH_KIND);
            let archived = access_frame::<Batch>(frame).unwrap();
            assert_equal(archived, &batches[seen]);
            seen += 1;
        })
        .unwrap();
        assert_eq!(frames, 30, "seed {seed}");
    }
}

#[test]
fn raw_payloads_of_every_small_length_round_trip() {
    let config = FrameConfig::default();
    let mut wire = Vec::new();
    let payloads: Vec<Vec<u8>> = (0..40).map(|n| (0..n as u8).collect()).collect();
    for (kind, payload) in payloads.iter().enumerate() {
        encode_frame(&config, kind as u8, payload, &mut wire).unwrap();
    }
    let mut seen = 0;
    decode_all(config, &wire, None, 5, |frame| {
        assert_eq!((frame.kind, frame.flags), (seen as u8, 0));
        assert_eq!(frame.payload, &payloads[seen][..]);
        seen += 1;
    })
    .unwrap();
    assert_eq!(seen, 40);
}

/// Encodes three batches and returns the wire and each frame's start.
fn three_frames() -> (Vec<u8>, Vec<usize>) {
    let config = FrameConfig::default();
    let mut rng = Rng(99);
    let mut wire = Vec::new();
    let mut starts = Vec::new();
    for seq in 0..3 {
        starts.push(wire.len());
        to_frame(&config, BATCH_KIND, &batch(&mut rng, seq), &mut wire).unwrap();
    }
    (wire, starts)
}

#[test]
fn corrupted_payload_byte_is_a_checksum_error_naming_frame_and_offset() {
    let (mut wire, starts) = three_frames();
    wire[starts[2] + FRAME_HEADER_BYTES + 5] ^= 0x01;
    let mut decoder = FrameDecoder::new(FrameConfig::default());
    assert_eq!(decoder.push(&wire), wire.len());
    assert!(decoder.next_frame().unwrap().is_some());
    assert!(decoder.next_frame().unwrap().is_some());
    for _ in 0..2 {
        let error = decoder.next_frame().unwrap_err();
        assert!(
            matches!(error, FrameError::Checksum { frame_number: 2, stream_offset, .. } if stream_offset == starts[2] as u64),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("frame 2") && message.contains(&format!("offset {}", starts[2])),
            "{message}"
        );
    }
    assert_eq!(decoder.push(b"more"), 0, "a failed decoder takes nothing");
}

#[test]
fn truncated_stream_waits_for_more_bytes() {
    let (wire, starts) = three_frames();
    let second = starts[1]..starts[2];
    for cut in second.clone() {
        let mut decoder = FrameDecoder::new(FrameConfig::default());
        decoder.push(&wire[..cut]);
        assert!(decoder.next_frame().unwrap().is_some(), "cut {cut}");
        assert!(decoder.next_frame().unwrap().is_none(), "cut {cut}");
        assert!(decoder.next_frame().unwrap().is_none(), "cut {cut}");
        decoder.push(&wire[cut..second.end]);
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.number, 1);
        access_frame::<Batch>(&frame).unwrap();
    }
}

#[test]
fn oversize_length_is_rejected_from_its_first_four_bytes() {
    let config = FrameConfig::new(256).unwrap();
    let mut wire = Vec::new();
    encode_frame(&config, 1, &[0; 256 - FRAME_HEADER_BYTES], &mut wire).unwrap();
    assert_eq!(wire.len(), 256);
    let mut decoder = FrameDecoder::new(config);
    decoder.push(&wire);
    assert!(decoder.next_frame().unwrap().is_some());
    decoder.push(&(256 - FRAME_HEADER_BYTES as u32 + 1).to_le_bytes());
    let error = decoder.next_frame().unwrap_err();
    assert_eq!(
        error,
        FrameError::Oversize {
            frame_number: 1,
            stream_offset: 256,
            frame_bytes: 256 + 16,
            frame_bytes_max: 256
        }
    );
    // Lengths near u32::MAX do not overflow.
    let mut decoder = FrameDecoder::new(config);
    decoder.push(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decoder.next_frame(),
        Err(FrameError::Oversize {
            frame_number: 0,
            ..
        })
    ));
}

#[test]
fn encoders_refuse_frames_over_the_bound_and_leave_output_unchanged() {
    let config = FrameConfig::new(128).unwrap();
    let mut out = vec![1, 2, 3];
    let error = encode_frame(&config, 1, &[0; 113], &mut out).unwrap_err();
    assert_eq!(
        error,
        FrameError::PayloadTooLarge {
            payload_bytes: 113,
            frame_bytes_max: 128
        }
    );
    assert_eq!(out, [1, 2, 3]);
    let big = Batch {
        seq: 1,
        keys: vec![7; 100],
        names: vec![],
    };
    let error = to_frame(&config, BATCH_KIND, &big, &mut out).unwrap_err();
    assert!(
        matches!(error, FrameError::PayloadTooLarge { .. }),
        "{error}"
    );
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn frame_config_bounds_are_checked() {
    for bad in [0, 15, 17, (1 << 30) + 16] {
        assert!(
            matches!(FrameConfig::new(bad), Err(FrameError::InvalidConfig { .. })),
            "{bad}"
        );
    }
    assert_eq!(FrameConfig::new(16).unwrap().payload_bytes_max(), 0);
}

#[test]
fn decoder_buffer_never_passes_the_bound() {
    let config = FrameConfig::new(1024).unwrap();
    let mut wire = Vec::new();
    let mut rng = Rng(5);
    let mut payloads = Vec::new();
    for kind in 0..200u8 {
        let payload: Vec<u8> = (0..rng.below(1008 + 1)).map(|_| kind).collect();
        encode_frame(&config, kind, &payload, &mut wire).unwrap();
        payloads.push(payload);
    }
    // One push of the whole stream takes at most frame_bytes_max bytes.
    let mut decoder = FrameDecoder::new(config);
    assert!(decoder.push(&wire) <= 1024);
    assert!(decoder.buffer_capacity_bytes() <= 1024);
    // Chunks larger than the bound still decode everything.
    let mut seen = 0;
    decode_all(config, &wire, Some(&mut rng), 5000, |frame| {
        assert_eq!(frame.payload, &payloads[seen][..]);
        seen += 1;
    })
    .unwrap();
    assert_eq!(seen, 200);
}

/// Builds a raw frame with a correct crc over whatever header bytes 8..16
/// and payload it is given.
fn raw_frame(header_tail: [u8; 8], payload: &[u8]) -> Vec<u8> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header_tail), payload);
    let mut frame = Vec::new();
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc.to_le_bytes());
    frame.extend_from_slice(&header_tail);
    frame.extend_from_slice(payload);
    frame.resize(frame_bytes(payload.len()), 0);
    frame
}

#[test]
fn nonzero_reserved_bits_are_rejected() {
    let mut wire = raw_frame([1, 0, 0, 0, 0, 0, 0, 0], b"ok");
    wire.extend(raw_frame([1, 0, 0, 0, 0, 0, 0, 9], b"bad"));
    let mut decoder = FrameDecoder::new(FrameConfig::default());
    decoder.push(&wire);
    assert_eq!(decoder.next_frame().unwrap().unwrap().payload, b"ok");
    assert_eq!(
        decoder.next_frame().unwrap_err(),
        FrameError::ReservedNotZero {
            frame_number: 1,
            stream_offset: 32
        }
    );
}

#[test]
fn payload_passing_crc_but_not_an_archive_is_a_validation_error() {
    let valid = {
        let mut wire = Vec::new();
        let batch = Batch {
            seq: 7,
            keys: vec![1, 2, 3],
            names: vec!["a fairly long name here".into()],
        };
        to_frame(&FrameConfig::default(), BATCH_KIND, &batch, &mut wire).unwrap();
        let length = u32::from_le_bytes(wire[..4].try_into().unwrap()) as usize;
        wire[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + length].to_vec()
    };
    let mut invalid_utf8 = valid.clone();
    let at = valid.windows(6).position(|w| w == b"fairly").unwrap();
    invalid_utf8[at] = 0xff;
    let mut rng = Rng(11);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated archive", valid[..valid.len() - 8].to_vec()),
        ("invalid utf-8 in a string", invalid_utf8),
        ("all 0xff", vec![0xff; 64]),
    ];
    for n in 0..50 {
        cases.push(("random", (0..8 + n * 3).map(|_| rng.next() as u8).collect()));
    }
    for (name, payload) in &cases {
        let wire = raw_frame([BATCH_KIND, 0, 0, 0, 0, 0, 0, 0], payload);
        let mut decoder = FrameDecoder::new(FrameConfig::default());
        decoder.push(&wire);
        let frame = decoder.next_frame().unwrap().unwrap();
        let error = access_frame::<Batch>(&frame).unwrap_err();
        assert!(
            matches!(
                error,
                FrameError::Archive {
                    frame_number: 0,
                    stream_offset: 0,
                    kind: BATCH_KIND,
                    ..
                }
            ),
            "{name}: {error}"
        );
    }
    // And the untouched archive is accepted by the same path.
    let wire = raw_frame([BATCH_KIND, 0, 0, 0, 0, 0, 0, 0], &valid);
    let mut decoder = FrameDecoder::new(FrameConfig::default());
    decoder.push(&wire);
    let frame = decoder.next_frame().unwrap().unwrap();
    assert_eq!(access_frame::<Batch>(&frame).unwrap().seq, 7);
}

/// A frame as a link writes it: flagged sealed, its crc field 0.
fn sealed(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    encode_frame(&FrameConfig::default(), kind, payload, &mut wire).unwrap();
    wire[4..8].fill(0);
    wire[9] = dirigo_net::frame::FLAG_SEALED;
    wire
}

/// A frame flagged sealed carries no crc: a decoder takes it only once
/// allowed to (a session's connection), then without a crc check; with
/// its crc field set, or where not allowed, it is refused, so a frame
/// whose flag bit flips on is never taken unchecked.
#[test]
fn a_sealed_frame_is_taken_without_a_crc_only_where_allowed() {
    let wire = sealed(5, b"sealed above");
    let mut plain = FrameDecoder::new(FrameConfig::default());
    plain.push(&wire);
    assert!(matches!(
        plain.next_frame(),
        Err(FrameError::Unsealed {
            frame_number: 0,
            stream_offset: 0
        })
    ));

    let mut allowed = FrameDecoder::new(FrameConfig::default());
    allowed.allow_sealed();
    let mut two = wire.clone();
    // A changed payload byte passes the frame layer: the seal's tag is
    // what checks it.
    let mut changed = wire.clone();
    changed[FRAME_HEADER_BYTES] ^= 1;
    two.extend_from_slice(&changed);
    allowed.push(&two);
    let frame = allowed.next_frame().unwrap().unwrap();
    assert_eq!(
        (frame.kind, frame.flags, frame.payload),
        (5, dirigo_net::frame::FLAG_SEALED, &b"sealed above"[..])
    );
    let frame = allowed.next_frame().unwrap().unwrap();
    assert_eq!(frame.payload[0], b's' ^ 1);

    // Plain frames are still checked there.
    let mut wire = Vec::new();
    encode_frame(&FrameConfig::default(), 6, b"plain", &mut wire).unwrap();
    wire[FRAME_HEADER_BYTES] ^= 1;
    let mut allowed = FrameDecoder::new(FrameConfig::default());
    allowed.allow_sealed();
    allowed.push(&wire);
    assert!(matches!(
        allowed.next_frame(),
        Err(FrameError::Checksum { .. })
    ));

    // Flagged sealed but with a crc field: refused.
    let mut wire = sealed(5, b"x");
    wire[4] = 1;
    let mut allowed = FrameDecoder::new(FrameConfig::default());
    allowed.allow_sealed();
    allowed.push(&wire);
    assert!(matches!(
        allowed.next_frame(),
        Err(FrameError::Unsealed { .. })
    ));
}

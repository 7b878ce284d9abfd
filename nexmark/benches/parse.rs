//! Parsers compared on the same JSON Lines, in one run: serde_json, sonic-rs and
//! simd-json into the flat borrowed struct of `parse.rs`; each of them on to an
//! `Event` (with interning); and `parse_event`, the path the file source takes
//! (the canonical-layout cursor, sonic-rs for anything else). Single thread; the
//! median of 3 passes each.
//!
//! `cargo bench -p dirigo-nexmark --bench parse [-- FILE]` (default: 200,000
//! generated events in memory).

use std::time::Instant;

use dirigo_nexmark::parse::{Flat, Interner};
use dirigo_nexmark::{write_json_line, Generator, GeneratorConfig};

fn lines(data: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', data) {
        if end > start {
            out.push((start, end));
        }
        start = end + 1;
    }
    out
}

fn measure(
    name: &str,
    data: &[u8],
    spans: &[(usize, usize)],
    mut f: impl FnMut(&mut [u8]) -> bool,
) {
    let mut samples = Vec::new();
    let mut scratch = data.to_vec();
    for _ in 0..3 {
        scratch.copy_from_slice(data);
        let started = Instant::now();
        let mut ok = 0usize;
        for &(s, e) in spans {
            ok += f(&mut scratch[s..e]) as usize;
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(ok, spans.len(), "{name}: every line parses");
        samples.push(secs);
    }
    samples.sort_by(f64::total_cmp);
    let secs = samples[1];
    println!(
        "{name:<34} {:>8.0} MB/s {:>8.2} M lines/s",
        data.len() as f64 / secs / 1e6,
        spans.len() as f64 / secs / 1e6
    );
}

fn main() {
    let data = match std::env::args().nth(1).filter(|a| !a.starts_with('-')) {
        Some(path) => std::fs::read(&path).expect("read the file"),
        None => {
            let g = Generator::new(GeneratorConfig::default()).unwrap();
            let mut events = Vec::new();
            g.fill(0..200_000, &mut events);
            let mut out = Vec::new();
            for e in &events {
                write_json_line(e, &mut out);
            }
            out
        }
    };
    let spans = lines(&data);
    println!("{} bytes, {} lines, one core", data.len(), spans.len());
    measure("serde_json -> Flat", &data, &spans, |l| {
        serde_json::from_slice::<Flat>(l).is_ok()
    });
    measure("sonic-rs -> Flat", &data, &spans, |l| {
        sonic_rs::from_slice::<Flat>(l).is_ok()
    });
    let mut buffers = simd_json::Buffers::default();
    measure("simd-json -> Flat", &data, &spans, |l| {
        simd_json::serde::from_slice_with_buffers::<Flat>(l, &mut buffers).is_ok()
    });
    let mut interner = Interner::default();
    measure("serde_json -> Flat -> Event", &data, &spans, |l| {
        serde_json::from_slice::<Flat>(l)
            .map_err(|e| e.to_string())
            .and_then(|f| f.into_event(&mut interner))
            .is_ok()
    });
    let mut interner = Interner::default();
    measure("sonic-rs -> Flat -> Event", &data, &spans, |l| {
        dirigo_nexmark::parse::parse_flat(l)
            .and_then(|f| f.into_event(&mut interner))
            .is_ok()
    });
    let mut interner = Interner::default();
    measure(
        "parse_event (canonical cursor, else sonic-rs)",
        &data,
        &spans,
        |l| dirigo_nexmark::parse::parse_event(&mut interner, l).is_ok(),
    );
    let mut interner = Interner::default();
    measure("simd-json -> Flat -> Event", &data, &spans, |l| {
        simd_json::serde::from_slice_with_buffers::<Flat>(l, &mut buffers)
            .map_err(|e| e.to_string())
            .and_then(|f| f.into_event(&mut interner))
            .is_ok()
    });
}

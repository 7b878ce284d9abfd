//! `dirigo gen`: Nexmark events as JSON Lines (NEXMARK.md's interchange format), on
//! stdout or into a file, formatted on several threads.
//!
//! The generator is seekable (event `n` depends on `(seed, n)` alone), so the
//! output is cut into chunks of [`CHUNK_EVENTS`] events and chunk `i` is formatted
//! by formatting thread `i % threads` (`interleaved_chunks`). The calling thread
//! writes the chunks in order: it takes chunk `i` from thread `i % threads`'s
//! channel, writes it, and hands the buffer back to that thread. Each thread owns
//! [`BUFFERS_PER_THREAD`] buffers and formats only into a buffer it got back, so
//! at most `threads * BUFFERS_PER_THREAD` chunks exist at once whatever
//! `--events` is (about 450 KB each): a slow disk holds the formatters back.
//!
//! The bytes are those of `write_json_line` over `Generator::fill(0..events)`,
//! for any number of threads. A write error stops the writer, which drops its
//! channels; every formatting thread then finds its channel closed and returns.

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use clap::Args;

use dirigo_engine::dataflow::RateSchedule;
use dirigo_nexmark::{interleaved_chunks, write_json_line, Generator, GeneratorConfig};

/// Events per chunk: about 450 KB of JSON, so a chunk is usually still in cache
/// when the writer copies it into the kernel. With 16,384-event chunks (3.5 MB)
/// that copy cost up to 0.5 s of system time more per 2M events (measured).
const CHUNK_EVENTS: u64 = 2_048;
/// Buffers each formatting thread owns: enough to keep formatting while the
/// writer is busy with another thread's chunk.
const BUFFERS_PER_THREAD: usize = 4;

#[derive(Args, Debug)]
pub struct GenArgs {
    /// Events to write.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Nominal rate (events per second of event time).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Write to this file instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Formatting threads (the output is the same for any number); default:
    /// every online core.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
}

pub fn run(args: GenArgs) -> Result<(), String> {
    let config = GeneratorConfig {
        seed: args.seed,
        rate: RateSchedule::constant(args.rate),
        ..GeneratorConfig::default()
    };
    let generator = Generator::new(config).map_err(|e| e.to_string())?;
    let threads = args
        .threads
        .map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize)
        .clamp(1, args.events.div_ceil(CHUNK_EVENTS) as usize);
    let (mut out, target): (Box<dyn Write>, String) = match &args.out {
        Some(path) => (
            Box::new(
                std::fs::File::create(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?,
            ),
            path.display().to_string(),
        ),
        None => (Box::new(std::io::stdout().lock()), "stdout".into()),
    };
    write_parallel(&generator, args.events, threads, &mut out)
        .map_err(|(written, e)| format!("cannot write to {target} after {written} events: {e}"))?;
    out.flush()
        .map_err(|e| format!("cannot write to {target}: {e}"))
}

/// One formatting thread's two ends: full buffers to the writer, empty ones back.
struct Lane {
    full: Receiver<Vec<u8>>,
    empty: SyncSender<Vec<u8>>,
}

/// Writes events `0..events` to `out` in order, formatted on `threads` threads.
/// On a write error, returns how many events were written before it.
fn write_parallel(
    generator: &Generator,
    events: u64,
    threads: usize,
    out: &mut dyn Write,
) -> Result<(), (u64, std::io::Error)> {
    std::thread::scope(|scope| {
        let lanes: Vec<Lane> = (0..threads)
            .map(|part| {
                let (full_tx, full) = sync_channel(BUFFERS_PER_THREAD);
                let (empty, empty_rx) = sync_channel(BUFFERS_PER_THREAD);
                for _ in 0..BUFFERS_PER_THREAD {
                    empty.send(Vec::new()).expect("the receiver is here");
                }
                let chunks = interleaved_chunks(0..events, part, threads, CHUNK_EVENTS);
                std::thread::Builder::new()
                    .name(format!("dirigo-gen{part}"))
                    .spawn_scoped(scope, move || {
                        format_chunks(generator, chunks, empty_rx, full_tx)
                    })
                    .expect("spawning a formatting thread");
                Lane { full, empty }
            })
            .collect();
        // The lanes are dropped on return, so on an error every formatter stops
        // before the scope joins it.
        let mut written = 0;
        for (chunk, range) in interleaved_chunks(0..events, 0, 1, CHUNK_EVENTS).enumerate() {
            let lane = &lanes[chunk % threads];
            let buffer = lane.full.recv().expect("a formatting thread panicked");
            out.write_all(&buffer).map_err(|e| (written, e))?;
            written = range.end;
            // A formatter that has no chunk left has returned; its buffer is not needed.
            let _ = lane.empty.send(buffer);
        }
        Ok(())
    })
}

/// A formatting thread: each of `chunks` into a buffer from `empty`, to `full`.
/// Returns when its chunks are done or the writer has gone.
fn format_chunks(
    generator: &Generator,
    chunks: impl Iterator<Item = Range<u64>>,
    empty: Receiver<Vec<u8>>,
    full: SyncSender<Vec<u8>>,
) {
    for range in chunks {
        let Ok(mut buffer) = empty.recv() else {
            return;
        };
        buffer.clear();
        generator.fill_with(range, |event| write_json_line(&event, &mut buffer));
        if full.send(buffer).is_err() {
            return;
        }
    }
}

//! `dirigo bench ingest`: how fast the parallel file source turns a JSON Lines
//! file into `Event`s, against a bare read of the same file through the same
//! reader, in the same run.
//!
//! - **parse**: a real dataflow job on a fresh engine with one shard per core:
//!   the file source (`nexmark::FileSplit`, one byte range per shard, parsed into
//!   `Event`) feeding a sink that drops the events. Elapsed is the job's own
//!   (from submission to the last sink's end of input).
//! - **read**: the same byte ranges read by `storage::read::RangeReader`, one
//!   plain consumer thread per range that counts the bytes and recycles the
//!   buffers: the I/O ceiling (from the page cache when the file is hot).
//!
//! `parse_ratio` = parse bytes/s over read bytes/s. Each figure is the median of
//! `runs`. Without `--file`, `events` generated events are written to a file in
//! a temporary directory first (setup, not timed; removed afterwards).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job, Sink};
use dirigo_nexmark::{write_json_line, Event, FileOptions, FileSplit, Generator, GeneratorConfig};
use dirigo_storage::read::{Chunk, RangeReader};

use crate::machine::Machine;
use crate::{median, progress, BenchError};

#[derive(Clone, Debug)]
pub struct Config {
    /// The file to read; `None`: generate `events` events into a temporary file.
    pub file: Option<PathBuf>,
    pub events: u64,
    /// Shards, and source partitions (one per shard).
    pub cores: usize,
    pub runs: usize,
    pub progress: bool,
    /// A measurement not finished after this long is an error.
    pub measurement_time_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            file: None,
            events: 2_000_000,
            cores: dirigo_engine::runtime::online_cores(),
            runs: 3,
            progress: true,
            measurement_time_max: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub bytes: u64,
    pub events: u64,
    /// Median over the runs of the parse measurement.
    pub events_per_s: f64,
    pub bytes_per_s: f64,
    /// Median over the runs of the bare read.
    pub read_bytes_per_s: f64,
    pub parse_ratio: f64,
    pub parse_s_samples: Vec<f64>,
    pub read_s_samples: Vec<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dirigo bench ingest: {} events, {:.1} MB, median of {} runs",
            self.events,
            self.bytes as f64 / 1e6,
            self.parse_s_samples.len()
        )?;
        writeln!(f, "machine: {} ({} cores)", self.machine, self.cores)?;
        writeln!(
            f,
            "parse (file source -> Event, dataflow job): {:.2}M events/s, {:.0} MB/s ({:.2}M events/s per core)",
            self.events_per_s / 1e6,
            self.bytes_per_s / 1e6,
            self.events_per_s / 1e6 / self.cores as f64
        )?;
        writeln!(
            f,
            "bare read (same reader, no parsing):        {:.0} MB/s",
            self.read_bytes_per_s / 1e6
        )?;
        write!(f, "parse ratio: {:.3}", self.parse_ratio)
    }
}

struct Drop_;

impl Sink<Event> for Drop_ {
    fn write(&mut self, _records: &[Event]) {}
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    let temp;
    let path = match &config.file {
        Some(path) => path.clone(),
        None => {
            temp = TempFile::generate(config.events)?;
            temp.0.clone()
        }
    };
    let split =
        FileSplit::plan(&path, config.cores as u32, FileOptions::default()).map_err(BenchError)?;
    let mut parse_s = Vec::new();
    let mut read_s = Vec::new();
    let mut events = 0;
    for run in 0..config.runs.max(1) {
        let (seconds, count) = parse_once(&split, config)?;
        progress(
            config.progress,
            format_args!("run {run}: parse {count} events in {seconds:.3} s"),
        );
        events = count;
        parse_s.push(seconds);
        let seconds = read_once(&path, &split)?;
        progress(
            config.progress,
            format_args!("run {run}: bare read in {seconds:.3} s"),
        );
        read_s.push(seconds);
    }
    let bytes = split.len_bytes();
    let parse = median(&parse_s);
    let read = median(&read_s);
    let machine = Machine::detect();
    Ok(Report {
        machine: machine.machine,
        cores: config.cores,
        bytes,
        events,
        events_per_s: events as f64 / parse,
        bytes_per_s: bytes as f64 / parse,
        read_bytes_per_s: bytes as f64 / read,
        parse_ratio: read / parse,
        parse_s_samples: parse_s,
        read_s_samples: read_s,
    })
}

fn parse_once(split: &FileSplit, config: &Config) -> Result<(f64, u64), BenchError> {
    let mut engine = DataflowConfig::default();
    engine.runtime.shards = config.cores;
    let mut dataflow: Dataflow = Dataflow::start(engine).map_err(|e| BenchError(e.to_string()))?;
    let mut job = Job::new("ingest", Duration::from_secs(1));
    let split = split.clone();
    let partitions = split.partitions();
    job.source(
        "file",
        partitions,
        Arc::new(move |p, _| Box::new(split.open(p))),
    )
    .sink("drop", partitions, Arc::new(|_| Box::new(Drop_)));
    let handle = dataflow.submit(job).map_err(BenchError)?;
    let report = handle.wait(config.measurement_time_max);
    dataflow.shutdown();
    let report = report.map_err(BenchError)?;
    Ok((report.elapsed.as_secs_f64(), report.source_records))
}

fn read_once(path: &Path, split: &FileSplit) -> Result<f64, BenchError> {
    let started = Instant::now();
    let threads: Vec<_> = (0..split.partitions())
        .map(|p| {
            let range = split.range(p);
            let path = path.to_path_buf();
            std::thread::spawn(move || -> Result<u64, String> {
                let mut reader = RangeReader::spawn(&path, range, Default::default())?;
                let mut bytes = 0;
                loop {
                    match reader.try_next() {
                        None => std::hint::spin_loop(),
                        Some(Chunk::Data {
                            bytes: buf, len, ..
                        }) => {
                            bytes += len as u64;
                            reader.recycle(buf);
                        }
                        Some(Chunk::End) => return Ok(bytes),
                        Some(Chunk::Failed(e)) => return Err(e),
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| BenchError("a read thread panicked".into()))?
            .map_err(BenchError)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if total != split.len_bytes() {
        return Err(BenchError(format!(
            "read {total} bytes of {}",
            split.len_bytes()
        )));
    }
    Ok(seconds)
}

/// A generated file in a temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn generate(events: u64) -> Result<TempFile, BenchError> {
        let dir = std::env::temp_dir().join(format!("dirigo-bench-ingest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| BenchError(format!("{}: {e}", dir.display())))?;
        let path = dir.join("events.jsonl");
        let generator =
            Generator::new(GeneratorConfig::default()).map_err(|e| BenchError(e.to_string()))?;
        let mut out = Vec::with_capacity(1 << 20);
        let mut batch = Vec::new();
        let mut file = std::fs::File::create(&path)
            .map_err(|e| BenchError(format!("{}: {e}", path.display())))?;
        let mut n = 0;
        while n < events {
            let end = (n + 4096).min(events);
            batch.clear();
            out.clear();
            generator.fill(n..end, &mut batch);
            for e in &batch {
                write_json_line(e, &mut out);
            }
            std::io::Write::write_all(&mut file, &out)
                .map_err(|e| BenchError(format!("{}: {e}", path.display())))?;
            n = end;
        }
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

//! `dirigo run <query>`: one Nexmark query on an embedded single-node engine, with
//! progress on stderr and a summary (or, with `--json`, one JSON line) on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;

use dirigo_engine::dataflow::checkpoint::{self, CheckpointOptions, StagedOutput};
use dirigo_nexmark::queries::{EventSource, LineWriter, Output, StagedLines};
use dirigo_nexmark::run::{run_query, RunConfig};
use dirigo_nexmark::GeneratorConfig;
use dirigo_storage::spool::{Spool, SPOOL_BUFFERS_MAX};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The query: q0, q1, q2, q3, q4, q5, q7 or q8.
    query: String,
    /// Events the generator produces (ignored with a file source).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,
    /// Input rate in events per second over all cores, or `max`.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    rate: Rate,
    /// Shards (cores) to run on; default: every online core.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    cores: Option<u64>,
    /// Allow more shards than online cores (they then share cores).
    #[arg(long)]
    oversubscribe: bool,
    /// Latency target of the job, e.g. `20ms`, `1s`, `500us`.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    slo: Duration,
    /// `nexmark` (the built-in generator) or `file:PATH` (JSON Lines, as `dirigo gen` writes).
    #[arg(long, default_value = "nexmark", value_parser = parse_source)]
    source: SourceArg,
    /// `null` (count rows), `stdout`, or `file:PATH` (JSON Lines).
    #[arg(long, default_value = "null", value_parser = parse_sink)]
    sink: SinkArg,
    /// Generator seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip malformed lines of a file source (counted) instead of failing.
    #[arg(long)]
    skip_malformed: bool,
    /// Longest line a file source accepts, in bytes (a longer one is malformed).
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    max_line_bytes: u64,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Take checkpoints into DIR, and resume from DIR's last complete one when
    /// the same command runs again (exactly-once `file:` output).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Time between checkpoints (with `--data-dir`).
    #[arg(long, default_value = "1s", value_parser = parse_duration, requires = "data_dir")]
    checkpoint_interval: Duration,
    /// Discard what `--data-dir` holds and start over.
    #[arg(long, requires = "data_dir")]
    fresh: bool,
}

/// What a data directory's run is: a rerun must be the same run to resume it.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct RunIdentity {
    query: String,
    source: String,
    sink: String,
    events: u64,
    seed: u64,
    rate: String,
    cores: usize,
    skip_malformed: bool,
    max_line_bytes: u64,
}

impl RunIdentity {
    fn of(args: &RunArgs, cores: usize) -> RunIdentity {
        RunIdentity {
            query: args.query.clone(),
            source: match &args.source {
                SourceArg::Nexmark => "nexmark".into(),
                SourceArg::File(path) => format!("file:{}", absolute(path).display()),
            },
            sink: match &args.sink {
                SinkArg::Null => "null".into(),
                SinkArg::Stdout => "stdout".into(),
                SinkArg::File(path) => format!("file:{}", absolute(path).display()),
            },
            events: match args.source {
                SourceArg::Nexmark => args.events,
                SourceArg::File(_) => 0,
            },
            seed: args.seed,
            rate: match args.rate {
                Rate::Max => "max".into(),
                Rate::PerSecond(n) => n.to_string(),
            },
            cores,
            skip_malformed: args.skip_malformed,
            max_line_bytes: args.max_line_bytes,
        }
    }

    /// The first field in which `self` (the saved run) and `now` differ.
    fn difference(&self, now: &RunIdentity) -> Option<String> {
        let saved = serde_json::to_value(self).ok()?;
        let now = serde_json::to_value(now).ok()?;
        let (saved, now) = (saved.as_object()?, now.as_object()?);
        saved.iter().find_map(|(field, value)| {
            let other = &now[field];
            (value != other).then(|| format!("{field} was {value} and is now {other}"))
        })
    }
}

fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What to do with a data directory before the run.
enum DataDir {
    /// Resume (or start) with checkpoints there.
    Run(CheckpointOptions),
    /// The run there has finished: nothing to do.
    Finished(u64),
}

/// Check `dir` against this command: create it, or discard it (`--fresh`), or
/// make sure it holds this same run; and say whether that run has finished.
fn prepare_data_dir(
    args: &RunArgs,
    dir: &std::path::Path,
    cores: usize,
) -> Result<DataDir, String> {
    let identity = RunIdentity::of(args, cores);
    let run_file = dir.join("run.json");
    if args.fresh {
        for inner in ["checkpoints", "staged"] {
            let path = dir.join(inner);
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .map_err(|e| format!("--fresh: cannot remove {}: {e}", path.display()))?;
            }
        }
        let _ = std::fs::remove_file(&run_file);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    match std::fs::read(&run_file) {
        Ok(bytes) => {
            let saved: RunIdentity = serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{} is not a Dirigo run description: {e}",
                    run_file.display()
                )
            })?;
            if let Some(difference) = saved.difference(&identity) {
                return Err(format!(
                    "the run in {} is a different run ({difference}); rerun the same command \
                     to resume it, or add --fresh to discard it",
                    dir.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = serde_json::to_vec_pretty(&identity).map_err(|e| e.to_string())?;
            dirigo_storage::commit_atomic(dir, "run.json", &bytes)
                .map_err(|e| format!("writing {}: {e}", run_file.display()))?;
        }
        Err(e) => return Err(format!("cannot read {}: {e}", run_file.display())),
    }
    match checkpoint::inspect(dir)? {
        Some(status) if status.finished => {
            checkpoint::complete_finished(dir)?;
            return Ok(DataDir::Finished(status.epoch));
        }
        Some(_) => {}
        // No manifest at all (not merely none readable, which the engine
        // reports without touching the output): a fresh run, whose output
        // starts empty (rows then come only from committed checkpoints).
        None if checkpoint::manifest_epochs(dir)?.is_empty() => {
            if let SinkArg::File(path) = &args.sink {
                std::fs::File::create(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            }
        }
        None => {}
    }
    Ok(DataDir::Run(CheckpointOptions::new(
        dir,
        args.checkpoint_interval,
    )))
}

#[derive(Clone, Copy, Debug)]
pub enum Rate {
    Max,
    PerSecond(u64),
}

#[derive(Clone, Debug)]
pub enum SourceArg {
    Nexmark,
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub enum SinkArg {
    Null,
    Stdout,
    File(PathBuf),
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Rate::PerSecond(n)),
        _ => Err(format!(
            "{s:?} is not a rate: give events per second (> 0) or `max`"
        )),
    }
}

/// `20ms`, `1s`, `500us`, `2m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 20ms, 1s or 500us)"))?;
    let seconds = match unit {
        "" | "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "s" => value,
        "m" => value * 60.0,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use us, ms, s or m)"
            ))
        }
    };
    if !(seconds > 0.0 && seconds < 86_400.0) {
        return Err(format!(
            "{s:?}: a duration must be above zero and below a day"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_source(s: &str) -> Result<SourceArg, String> {
    match s {
        "nexmark" => Ok(SourceArg::Nexmark),
        _ => match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SourceArg::File(PathBuf::from(path))),
            _ => Err(format!(
                "{s:?} is not a source: use `nexmark` or `file:PATH`"
            )),
        },
    }
}

fn parse_sink(s: &str) -> Result<SinkArg, String> {
    match s {
        "null" => Ok(SinkArg::Null),
        "stdout" => Ok(SinkArg::Stdout),
        _ => match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SinkArg::File(PathBuf::from(path))),
            _ => Err(format!(
                "{s:?} is not a sink: use `null`, `stdout` or `file:PATH`"
            )),
        },
    }
}

/// Hands a sink partition's JSON Lines to a spool: the file or stdout is written
/// on the spool's own thread, never on a shard. The first write error is kept and
/// reported after the run.
struct SpoolWriter {
    spool: Spool,
    error: Arc<Mutex<Option<String>>>,
}

impl LineWriter for SpoolWriter {
    fn write_lines(&mut self, lines: &[u8]) {
        let mut buffer = self.spool.buffer();
        buffer.extend_from_slice(lines);
        self.spool.write(buffer);
    }

    fn finish(&mut self) {
        if let Err(e) = self.spool.finish() {
            self.error.lock().expect("sink error lock").get_or_insert(e);
        }
    }
}

/// JSON Lines into one spool over `out` (one sink partition takes it).
fn spool_output(
    out: Box<dyn Write + Send>,
    target: &str,
    error: Arc<Mutex<Option<String>>>,
) -> Output {
    let spool = Arc::new(Mutex::new(Some(Spool::new(out, target, SPOOL_BUFFERS_MAX))));
    Output::JsonLines(Arc::new(move |_| {
        let spool = spool.lock().expect("spool lock").take();
        let spool = spool.expect("one sink partition writes to the spool");
        Box::new(SpoolWriter {
            spool,
            error: error.clone(),
        })
    }))
}

/// Where rows go without a data directory: straight through a spool.
fn plain_output(
    sink: &SinkArg,
    cores: usize,
    error: &Arc<Mutex<Option<String>>>,
) -> Result<(Output, u32), String> {
    Ok(match sink {
        SinkArg::Null => (Output::Null, cores as u32),
        SinkArg::Stdout => {
            let out: Box<dyn Write + Send> = Box::new(std::io::stdout());
            (spool_output(out, "stdout", error.clone()), 1)
        }
        SinkArg::File(path) => {
            let file = std::fs::File::create(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let out: Box<dyn Write + Send> =
                Box::new(std::io::BufWriter::with_capacity(1 << 20, file));
            (
                spool_output(out, &path.display().to_string(), error.clone()),
                1,
            )
        }
    })
}

pub fn run(args: RunArgs) -> Result<(), String> {
    let cores = args
        .cores
        .map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize);
    let rate = match args.rate {
        Rate::Max => None,
        Rate::PerSecond(n) => Some(n),
    };
    let source = match &args.source {
        SourceArg::Nexmark => {
            // A paced run's event time advances with wall time: the rate is also the nominal rate.
            let mut config = GeneratorConfig {
                seed: args.seed,
                ..GeneratorConfig::default()
            };
            if let Some(rate) = rate {
                config.rate = dirigo_engine::dataflow::RateSchedule::constant(rate);
            }
            EventSource::Generator {
                config,
                events: args.events,
            }
        }
        SourceArg::File(path) => EventSource::File {
            path: path.clone(),
            options: dirigo_nexmark::FileOptions {
                skip_malformed: args.skip_malformed,
                max_line_bytes: args.max_line_bytes as usize,
                ..dirigo_nexmark::FileOptions::default()
            },
        },
    };
    let checkpoints = match &args.data_dir {
        None => None,
        Some(dir) => {
            if matches!(args.sink, SinkArg::Stdout) {
                return Err(
                    "--data-dir needs --sink file:PATH or null: rows written to stdout cannot \
                     be taken back after a crash"
                        .into(),
                );
            }
            match prepare_data_dir(&args, dir, cores)? {
                DataDir::Finished(epoch) => {
                    let output = match &args.sink {
                        SinkArg::File(path) => format!("; its output is in {}", path.display()),
                        _ => String::new(),
                    };
                    println!(
                        "the run in {} has already finished (checkpoint {epoch}){output}",
                        dir.display()
                    );
                    return Ok(());
                }
                DataDir::Run(options) => Some(options),
            }
        }
    };
    let error = Arc::new(Mutex::new(None));
    let (output, sink_parallelism) = match (&args.sink, &checkpoints) {
        (SinkArg::File(path), Some(options)) => {
            // Exactly once: rows are staged per checkpoint in the data
            // directory and appended to PATH when their checkpoint commits.
            let (dir, path) = (options.dir.clone(), absolute(path));
            let factory: dirigo_nexmark::queries::LineWriterFactory = Arc::new(move |partition| {
                let staged = StagedOutput::new(&dir, path.clone(), &format!("sink-{partition}"))
                    .unwrap_or_else(|e| panic!("staging output: {e}"));
                Box::new(StagedLines(staged))
            });
            (Output::JsonLines(factory), 1)
        }
        (sink, _) => plain_output(sink, cores, &error)?,
    };
    let expected = match args.source {
        SourceArg::Nexmark => Some(args.events),
        SourceArg::File(_) => None,
    };
    let started = std::time::Instant::now();
    let progress = Arc::new(move |records: u64, outputs: u64| {
        if started.elapsed() < Duration::from_secs(1) {
            return;
        }
        let per_s = records as f64 / started.elapsed().as_secs_f64();
        match expected {
            Some(total) => {
                let done = (records as f64 / total as f64).min(1.0);
                let bar = "#".repeat((done * 30.0) as usize);
                eprint!(
                    "\r[{bar:<30}] {:>5.1}%  {records} events  {:.2}M events/s  {outputs} rows ",
                    done * 100.0,
                    per_s / 1e6
                );
            }
            None => eprint!(
                "\r{records} events  {:.2}M events/s  {outputs} rows ",
                per_s / 1e6
            ),
        }
    });
    let report = run_query(&RunConfig {
        query: args.query.clone(),
        cores,
        oversubscribe: args.oversubscribe,
        source,
        output,
        sink_parallelism,
        rate_events_per_s: rate,
        slo: args.slo,
        progress: Some(progress),
        time_limit: Duration::from_secs(24 * 3600),
        checkpoints,
    })
    .map_err(|e| e.to_string())?;
    if started.elapsed() >= Duration::from_secs(1) {
        eprintln!();
    }
    if let Some(error) = error.lock().expect("sink error lock").take() {
        return Err(error);
    }
    let machine = dirigo_nexmark::machine::Machine::detect();
    if args.json {
        let json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        let l = &report.latency_us;
        println!("query        {}", report.query);
        println!(
            "machine      {} ({} cores used)",
            machine.machine, report.cores
        );
        println!("events       {}", report.events);
        println!("elapsed      {:.3} s", report.elapsed_s);
        println!(
            "throughput   {:.0} events/s ({:.0} per core)",
            report.events_per_s, report.events_per_s_per_core
        );
        if report.skipped > 0 {
            println!("skipped      {} malformed input lines", report.skipped);
        }
        println!("outputs      {}", report.outputs);
        println!(
            "late         {} records behind their stage's watermark (dropped from fired windows)",
            report.late
        );
        println!(
            "latency      p50 {} us, p99 {} us, p99.9 {} us, max {} us",
            l.p50, l.p99, l.p999, l.max
        );
        println!(
            "scheduling   {} messages, {} past their deadline (SLO {:?}), queueing p99 {} us, {} stalled turns",
            report.messages, report.deadline_misses, args.slo, report.queue_us_p99, report.stalls
        );
        if let Some(c) = &report.checkpoints {
            let resumed = c
                .resumed_from
                .map_or(String::new(), |e| format!(", resumed from checkpoint {e}"));
            println!(
                "checkpoints  {} committed, {} failed{resumed}; p99 {} ms, alignment p99 {:.1} ms, state {} bytes",
                c.completed, c.failed, c.checkpoint_ms_p99, c.alignment_ms_p99, c.state_bytes
            );
            if let Some(error) = &c.last_error {
                println!("             last failure: {error}");
            }
        }
    }
    Ok(())
}

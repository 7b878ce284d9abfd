//! `dirigo run <query>`: one Nexmark query on an embedded single-node engine, with
//! progress on stderr and a summary (or, with `--json`, one JSON line) on stdout;
//! `dirigo run --job "QUERY FLAGS" --job ...`: several queries at once on one
//! engine, time-sharing its shards, with one summary block per job.
//!
//! A `--job` string is split like a shell would and parsed by the same clap
//! definitions as the single-job form ([`JobArgs`]), so both take the same
//! per-job flags with the same defaults and errors; the process-wide flags
//! (`--cores`, `--oversubscribe`, `--json`, `--scheduler`) stay outside.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Parser};

use dirigo_engine::dataflow::checkpoint::{self, CheckpointOptions, StagedOutput};
use dirigo_engine::dataflow::AutoscaleOptions;
use dirigo_engine::dataflow::{RateSchedule, RateStep};
use dirigo_engine::runtime::PolicyKind;
use dirigo_nexmark::machine::Machine;
use dirigo_nexmark::queries::{EventSource, LineWriter, Output, StagedLines};
use dirigo_nexmark::run::{
    run_jobs, EngineOptions, JobConfig, LiveFigures, NodesOptions, RunError, RunReport,
};
use dirigo_nexmark::GeneratorConfig;
use dirigo_storage::spool::{Spool, SPOOL_BUFFERS_MAX};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The query: q0, q1, q2, q3, q4, q5, q7 or q8 (or give jobs with --job).
    #[arg(required_unless_present = "jobs")]
    query: Option<String>,
    #[command(flatten)]
    job: JobArgs,
    /// A job to run next to the others, as its query and per-job flags in one
    /// string, e.g. `--job "q1 --rate 200000 --slo 10ms"`; repeat it for each
    /// job. Per-job flags then go inside the --job strings only.
    #[arg(
        long = "job",
        value_name = "QUERY FLAGS",
        value_parser = parse_job,
        conflicts_with_all = [
            "query", "events", "rate", "slo", "source", "sink", "seed", "skip_malformed",
            "max_line_bytes", "data_dir", "checkpoint_interval", "fresh", "parallelism",
            "fence_epoch",
        ]
    )]
    jobs: Vec<JobSpec>,
    /// Shards (cores) to run on; default: every online core.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    cores: Option<u64>,
    /// Allow more shards than online cores (they then share cores).
    #[arg(long)]
    oversubscribe: bool,
    /// How each shard picks the actor that runs next: `edf` (earliest deadline
    /// first), `fifo` (earliest arrival, the baseline) or `fair` (fair share per job).
    #[arg(long, default_value = "edf", value_parser = clap::value_parser!(PolicyKind))]
    scheduler: PolicyKind,
    /// `on`: the autoscaler moves actors between shards to keep each under
    /// its load mark and its jobs' SLOs; `off`: placement stays as made (the
    /// baseline).
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    autoscale: bool,
    /// Print each autoscaler decision to stderr, with its reason and figures.
    #[arg(long)]
    log_decisions: bool,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// In place of the progress, print each job's output latency over the
    /// last second to stderr every second, one line per job starting with
    /// [`LIVE_PREFIX`] (`dirigo node` reads its runs' lines).
    #[arg(long, hide = true)]
    live: bool,
    /// Run over several processes: every node's address (`IP:PORT`,
    /// comma-separated, the same list on every node), each running
    /// `--cores` shards; the jobs' actors are placed over all of them.
    /// Each node prints its own part (its sources' records, its sinks'
    /// rows, written to its own `--sink`); the job ends on every node when
    /// every sink partition has. Needs `--node` and `--secret-file`; each
    /// node's autoscaler moves actors among its own shards (node 0's also
    /// splits key-group ranges). With `--data-dir` (the same directory on every
    /// node: one file system, or a shared one) node 0 commits the job's
    /// checkpoints, each node's actors writing their own state there, and
    /// its `--sink file:` holds the exactly-once output.
    #[arg(long, value_delimiter = ',', requires_all = ["node", "secret_file"])]
    nodes: Vec<std::net::SocketAddr>,
    /// This process's place (from 0) in `--nodes`; node 0 starts the jobs.
    #[arg(long, requires = "nodes")]
    node: Option<usize>,
    /// The run's shared secret (at least 16 bytes): every connection between
    /// the nodes is authenticated both ways with it.
    #[arg(long, requires = "nodes")]
    secret_file: Option<PathBuf>,
}

/// The flags of one job: those of `dirigo run QUERY`, and those a `--job`
/// string takes after its query.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Events the generator produces (ignored with a file source).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,
    /// Input rate in events per second over all cores, `max`, or a schedule of
    /// steps RATE/DURATION, the last one held until --events is reached (e.g.
    /// `50000/1s,3000000/2s,50000`).
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    rate: Rate,
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
    /// Fix the job's parallelism (activations of each keyed stage) and keep
    /// the autoscaler off it; default: two per shard, placed by the autoscaler.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    parallelism: Option<u32>,
    /// The cluster's placement of this run (`dirigo node` sets it): the run
    /// claims the data directory with it and commits no checkpoint once a
    /// later placement has claimed it.
    #[arg(long, hide = true, requires = "data_dir")]
    fence_epoch: Option<u64>,
}

/// One job: a query and its flags.
#[derive(Parser, Debug, Clone)]
#[command(name = "--job", no_binary_name = true, disable_help_flag = true)]
pub struct JobSpec {
    /// The query: q0, q1, q2, q3, q4, q5, q7 or q8.
    query: String,
    #[command(flatten)]
    args: JobArgs,
    /// The job as the user wrote it (the --job string), to name it in reports.
    #[arg(skip)]
    text: String,
}

/// A `--job` string: split like a shell would (quotes and backslashes), then
/// parsed as the single-job form's query and flags. The error is clap's (its
/// first paragraph, on one line), which the outer parser reports with the
/// whole string.
fn parse_job(s: &str) -> Result<JobSpec, String> {
    let words = shlex::split(s).ok_or_else(|| "unbalanced quotes or a trailing \\".to_string())?;
    let mut spec = JobSpec::try_parse_from(words).map_err(|e| {
        let rendered = e.render().to_string();
        let paragraph: Vec<&str> = rendered
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(str::trim)
            .collect();
        let text = paragraph.join(" ");
        text.strip_prefix("error: ").unwrap_or(&text).to_string()
    })?;
    spec.text = s.trim().to_string();
    Ok(spec)
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
    /// Shards over all the run's nodes (a run over nodes resumes over
    /// another number of nodes with as many shards in all).
    #[serde(alias = "cores")]
    shards: usize,
    skip_malformed: bool,
    max_line_bytes: u64,
    /// Stages' activations (`--parallelism`); key groups are owned by
    /// activation, so a run resumes only with the same.
    #[serde(default)]
    parallelism: Option<u32>,
}

impl RunIdentity {
    fn of(spec: &JobSpec, shards: usize) -> RunIdentity {
        let args = &spec.args;
        RunIdentity {
            query: spec.query.clone(),
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
            // A constant rate is its number, as before schedules.
            rate: match &args.rate {
                Rate::Max => "max".into(),
                Rate::Paced(schedule) => schedule.to_string(),
            },
            shards,
            skip_malformed: args.skip_malformed,
            max_line_bytes: args.max_line_bytes,
            parallelism: args.parallelism,
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

fn absolute(path: &Path) -> PathBuf {
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
fn prepare_data_dir(spec: &JobSpec, dir: &Path, shards: usize) -> Result<DataDir, String> {
    let args = &spec.args;
    let identity = RunIdentity::of(spec, shards);
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

/// As `prepare_data_dir` for a node other than node 0 of a run over nodes,
/// which changes nothing there: the directory's run, if node 0 wrote it
/// already, must be this one; and whether it has finished (node 0 redoes
/// its last append).
fn check_data_dir(spec: &JobSpec, dir: &Path, shards: usize) -> Result<DataDir, String> {
    let run_file = dir.join("run.json");
    match std::fs::read(&run_file) {
        Ok(bytes) => {
            let mut saved: RunIdentity = serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{} is not a Dirigo run description: {e}",
                    run_file.display()
                )
            })?;
            let now = RunIdentity::of(spec, shards);
            // The output is node 0's (its sink partition, the only one): this
            // node's `--sink` is its own.
            saved.sink.clone_from(&now.sink);
            if let Some(difference) = saved.difference(&now) {
                return Err(format!(
                    "the run in {} is a different run ({difference})",
                    dir.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", run_file.display())),
    }
    if let Some(status) = checkpoint::inspect(dir)?.filter(|s| s.finished) {
        return Ok(DataDir::Finished(status.epoch));
    }
    Ok(DataDir::Run(CheckpointOptions::new(
        dir,
        spec.args.checkpoint_interval,
    )))
}

#[derive(Clone, Debug)]
pub enum Rate {
    Max,
    /// A constant rate is a schedule of one step.
    Paced(RateSchedule),
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

/// `max`, events per second (`200000`), or a schedule: steps `RATE/DURATION`
/// separated by commas, the last one's duration optional (it holds until the
/// events are all produced). Durations are whole milliseconds.
fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    let parts: Vec<&str> = s.split(',').collect();
    let mut steps = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let step = parse_rate_step(part, last).map_err(|e| match parts.len() {
            1 => e,
            _ => format!("step {} ({part:?}) of {s:?}: {e}", i + 1),
        })?;
        steps.push(step);
    }
    RateSchedule::new(&steps).map(Rate::Paced)
}

/// One step of a rate schedule: `RATE/DURATION`, or a bare `RATE` if `last`.
fn parse_rate_step(step: &str, last: bool) -> Result<RateStep, String> {
    let (rate, duration) = match step.split_once('/') {
        Some((rate, duration)) => (rate, Some(duration)),
        None => (step, None),
    };
    // 0 is a pause, and only a step with a duration can be one.
    let per_s = match rate.parse::<u64>() {
        Ok(n) if n > 0 || duration.is_some() => n,
        _ => {
            return Err(format!(
                "{rate:?} is not a rate: give events per second (> 0), `max`, or a schedule \
                 such as 50000/1s,0/2s,50000 (0 for a pause)"
            ))
        }
    };
    let duration_ms = match duration {
        None if last => 0,
        None => {
            return Err(format!(
                "no duration: every step but the last is RATE/DURATION, e.g. {per_s}/1s"
            ))
        }
        Some(duration) => {
            // In whole microseconds first: `parse_duration` goes through f64.
            let micros = (parse_duration(duration)?.as_secs_f64() * 1e6).round() as u64;
            if !micros.is_multiple_of(1000) {
                return Err(format!(
                    "{duration:?}: a step lasts a whole number of milliseconds"
                ));
            }
            micros / 1000
        }
    };
    Ok(RateStep { per_s, duration_ms })
}

/// `20ms`, `1s`, `500us`, `2m`; a bare number is milliseconds.
/// `on` or `off`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: expected `on` or `off`")),
    }
}

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

/// What becomes of one job before the engine starts.
enum Prepared {
    /// It runs; the cell holds its output's first write error.
    Run(Box<JobConfig>, Arc<Mutex<Option<String>>>),
    /// Its data directory holds a run that has finished: this says so.
    Finished(String),
}

/// Make one job ready to run: its source, its data directory, its output.
/// A `peer` (a node other than node 0 of a run over nodes) only reads the
/// data directory. `shards`: over all the run's nodes.
fn prepare(spec: &JobSpec, shards: usize, peer: bool) -> Result<Prepared, String> {
    dirigo_nexmark::queries::check(&spec.query)?;
    let args = &spec.args;
    let pace = match &args.rate {
        Rate::Max => None,
        Rate::Paced(schedule) => Some(schedule.clone()),
    };
    let source = match &args.source {
        SourceArg::Nexmark => {
            // A paced run's event time advances with wall time: the schedule
            // is also the nominal rate.
            let mut config = GeneratorConfig {
                seed: args.seed,
                ..GeneratorConfig::default()
            };
            if let Some(schedule) = &pace {
                config.rate = schedule.clone();
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
            let prepared = match peer {
                true => check_data_dir(spec, dir, shards)?,
                false => prepare_data_dir(spec, dir, shards)?,
            };
            match prepared {
                DataDir::Finished(epoch) => {
                    let output = match &args.sink {
                        SinkArg::File(path) => format!("; its output is in {}", path.display()),
                        _ => String::new(),
                    };
                    return Ok(Prepared::Finished(format!(
                        "the run in {} has already finished (checkpoint {epoch}){output}",
                        dir.display()
                    )));
                }
                DataDir::Run(options) => Some(CheckpointOptions {
                    fence: args.fence_epoch,
                    ..options
                }),
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
        (sink, _) => plain_output(sink, shards, &error)?,
    };
    let config = JobConfig {
        query: spec.query.clone(),
        source,
        output,
        sink_parallelism,
        pace,
        slo: args.slo,
        checkpoints,
        parallelism: args.parallelism,
    };
    Ok(Prepared::Run(Box::new(config), error))
}

/// Where `path` leads, to compare two: its directory resolved (links, `..`)
/// when it exists, and its name.
fn place(path: &Path) -> PathBuf {
    let path = absolute(path);
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|parent| parent.join(name))
            .unwrap_or(path),
        _ => path,
    }
}

/// Jobs of one run never share an output file or a data directory (their rows
/// and checkpoints would overwrite each other's), and at most one writes rows
/// to stdout (two would interleave with nothing to tell them apart).
fn check_distinct(specs: &[JobSpec]) -> Result<(), String> {
    let mut files: Vec<(PathBuf, usize)> = Vec::new();
    let mut dirs: Vec<(PathBuf, usize)> = Vec::new();
    let mut stdout: Option<usize> = None;
    for (i, spec) in specs.iter().enumerate() {
        let job = i + 1;
        match &spec.args.sink {
            SinkArg::File(path) => {
                let place = place(path);
                if let Some((_, other)) = files.iter().find(|(p, _)| *p == place) {
                    return Err(format!(
                        "jobs {other} and {job} both write to {}: give each job its own \
                         --sink file:PATH",
                        path.display()
                    ));
                }
                files.push((place, job));
            }
            SinkArg::Stdout => {
                if let Some(other) = stdout.replace(job) {
                    return Err(format!(
                        "jobs {other} and {job} both write to stdout: give at most one job \
                         --sink stdout"
                    ));
                }
            }
            SinkArg::Null => {}
        }
        if let Some(dir) = &spec.args.data_dir {
            let place = place(dir);
            if let Some((_, other)) = dirs.iter().find(|(p, _)| *p == place) {
                return Err(format!(
                    "jobs {other} and {job} both keep checkpoints in {}: give each job its own \
                     --data-dir",
                    dir.display()
                ));
            }
            dirs.push((place, job));
        }
    }
    Ok(())
}

/// What came of one job.
enum Outcome {
    Ran(Box<RunReport>),
    Failed(String),
    /// It had finished in an earlier run (the message says where).
    Finished(String),
}

/// Progress on stderr for runs longer than a second: a bar when the number of
/// events is known (every job reads the generator), else a count.
fn progress(expected: Option<u64>) -> dirigo_nexmark::run::Progress {
    let started = std::time::Instant::now();
    Arc::new(move |records: u64, outputs: u64| {
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
    })
}

/// What starts a line of `--live` figures on stderr.
pub const LIVE_PREFIX: &str = "dirigo-live: ";

/// `--live`: each job's figures ([`LiveFigures`]) as a line of JSON after
/// [`LIVE_PREFIX`], with the job's place in the run (`"job"`, from 0).
fn live_lines() -> dirigo_nexmark::run::LiveHook {
    Arc::new(|figures: &[Option<LiveFigures>]| {
        for (job, figures) in figures.iter().enumerate() {
            let Some(figures) = figures else { continue };
            let mut line = serde_json::to_value(figures).expect("plain figures");
            line["job"] = job.into();
            eprintln!("{LIVE_PREFIX}{line}");
        }
    })
}

/// `dirigo run`'s exit status when a run over nodes lost a peer
/// ([`RunError::PeerLost`]: a cluster node runs it again rather than
/// failing the job); [`EXIT_PORT_TAKEN`] when it could not listen; any
/// other failure exits with 1.
pub const EXIT_PEER_LOST: u8 = 3;
/// `dirigo run`'s exit status when a run over nodes could not listen on
/// its address, another process holding the port ([`RunError::PortTaken`]).
pub const EXIT_PORT_TAKEN: u8 = 4;

pub fn run(args: RunArgs) -> Result<(), RunError> {
    let cores = args
        .cores
        .map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize);
    let single = args.jobs.is_empty();
    let specs = match args.query {
        Some(query) => vec![JobSpec {
            text: query.clone(),
            query,
            args: args.job,
        }],
        None => args.jobs,
    };
    check_distinct(&specs)?;
    // Before any output file is opened.
    let nodes = nodes_options(
        &args.nodes,
        args.node,
        args.secret_file.as_deref(),
        cores,
        &specs,
    )?;
    // Over nodes, node 0 alone writes to a data directory before the run.
    let peer = nodes.as_ref().is_some_and(|n| n.me != 0);
    let shards = cores * nodes.as_ref().map_or(1, |n| n.addrs.len());
    let mut prepared = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        prepared.push(prepare(spec, shards, peer).map_err(|e| match single {
            true => e,
            false => format!("job {} ({}): {e}", i + 1, spec.text),
        })?);
    }
    if single {
        if let Prepared::Finished(message) = &prepared[0] {
            println!("{message}");
            return Ok(());
        }
    }
    let generated = specs.iter().map(|spec| match spec.args.source {
        SourceArg::Nexmark => Some(spec.args.events),
        SourceArg::File(_) => None,
    });
    let expected = generated.sum::<Option<u64>>();
    let configs: Vec<JobConfig> = prepared
        .iter()
        .filter_map(|p| match p {
            Prepared::Run(config, _) => Some(JobConfig::clone(config)),
            Prepared::Finished(_) => None,
        })
        .collect();
    let started = std::time::Instant::now();
    let engine = EngineOptions {
        cores,
        oversubscribe: args.oversubscribe,
        scheduler: args.scheduler,
        autoscale: args.autoscale.then(|| AutoscaleOptions {
            log_decisions: args.log_decisions,
            ..AutoscaleOptions::default()
        }),
        progress: (!args.live).then(|| progress(expected)),
        live: args.live.then(live_lines),
        time_limit: Duration::from_secs(24 * 3600),
        nodes,
    };
    let reports = run_jobs(&engine, &configs);
    // The progress line ends, whatever follows (a summary, or an error).
    if started.elapsed() >= Duration::from_secs(1) && !args.live {
        eprintln!();
    }
    let mut reports = reports?.into_iter();
    let outcomes: Vec<Outcome> = prepared
        .into_iter()
        .map(|p| match p {
            Prepared::Finished(message) => Outcome::Finished(message),
            Prepared::Run(_, error) => {
                let report = reports.next().expect("a report per job that ran");
                let sink_error = error.lock().expect("sink error lock").take();
                match (report, sink_error) {
                    (Err(e), _) | (Ok(_), Some(e)) => Outcome::Failed(e),
                    (Ok(report), None) => Outcome::Ran(Box::new(report)),
                }
            }
        })
        .collect();
    let machine = Machine::detect();
    if single {
        return match outcomes.into_iter().next().expect("one job") {
            Outcome::Ran(report) => Ok(print_single(&report, &machine, args.json)?),
            Outcome::Failed(error) => Err(error.into()),
            Outcome::Finished(_) => unreachable!("a finished single run returned above"),
        };
    }
    Ok(print_jobs(
        &specs,
        &outcomes,
        &machine,
        cores,
        &engine.scheduler,
        args.json,
    )?)
}

/// `--nodes`, `--node` and `--secret-file` as a run over nodes (`None`
/// without `--nodes`).
fn nodes_options(
    addrs: &[std::net::SocketAddr],
    node: Option<usize>,
    secret_file: Option<&std::path::Path>,
    cores: usize,
    specs: &[JobSpec],
) -> Result<Option<NodesOptions>, String> {
    if addrs.is_empty() {
        return Ok(None);
    }
    if let Some(spec) = specs.iter().find(|s| s.args.fresh) {
        return Err(format!(
            "job {}: --fresh with --nodes: another node may be reading the data directory; \
             remove it instead, with every node stopped",
            spec.text
        ));
    }
    for (i, addr) in addrs.iter().enumerate() {
        if addrs[..i].contains(addr) {
            return Err(format!("--nodes lists {addr} twice"));
        }
    }
    let me = node.ok_or("--nodes needs --node")?;
    if me >= addrs.len() {
        return Err(format!(
            "--node {me}: --nodes lists {} nodes (0 to {})",
            addrs.len(),
            addrs.len() - 1
        ));
    }
    let path = secret_file.ok_or("--nodes needs --secret-file")?;
    let secret = crate::node::client::read_secret(path)?;
    let min = dirigo_net::handshake::SECRET_BYTES_MIN;
    if secret.len() < min {
        return Err(format!(
            "--secret-file {}: {} bytes, fewer than the {min} a secret needs",
            path.display(),
            secret.len()
        ));
    }
    // What every node must agree on: the build (record batches cross as
    // archives checked by their type's name), the nodes, each one's
    // shards, and the jobs as their queries and the flags that make their
    // records and checkpoints (of their sinks only the kind: each node
    // writes its own). A peer that differs is refused at the handshake,
    // which checks the run's name.
    let mut identity = std::collections::hash_map::DefaultHasher::new();
    hash_file(
        &mut identity,
        &std::env::current_exe().map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("reading this program, for the run's name: {e}"))?;
    (addrs, cores).hash(&mut identity);
    for spec in specs {
        let a = &spec.args;
        // The sink's kind sets its partitions (a file is one); with a data
        // directory, what it holds: every node must resume from the same
        // checkpoint (and skip the same finished runs, so that the jobs'
        // ids agree), which a node given another directory would not.
        let sink = match &a.sink {
            SinkArg::Null => "null",
            SinkArg::Stdout => "stdout",
            SinkArg::File(_) => "file",
        };
        let data = match &a.data_dir {
            Some(dir) => checkpoint::inspect(dir)?.map(|s| (s.epoch, s.finished)),
            None => None,
        };
        (sink, data).hash(&mut identity);
        let shape = format!(
            "{} {} {:?} {} {:?} {} {} {} {:?} {} {}",
            spec.query,
            a.events,
            a.rate,
            a.slo.as_nanos(),
            a.source,
            a.seed,
            a.skip_malformed,
            a.max_line_bytes,
            a.parallelism,
            a.data_dir.is_some(),
            a.checkpoint_interval.as_nanos(),
        );
        shape.hash(&mut identity);
    }
    Ok(Some(NodesOptions {
        addrs: addrs.to_vec(),
        me,
        secret,
        cluster: format!("dirigo-run-{:016x}", identity.finish()),
    }))
}

/// Feed the bytes of the file at `path` to `hasher`, 64 KiB at a time.
fn hash_file(hasher: &mut impl Hasher, path: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => hasher.write(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The summary of `dirigo run QUERY`: one JSON object, or the lines of the job.
fn print_single(report: &RunReport, machine: &Machine, json: bool) -> Result<(), String> {
    if json {
        let json = serde_json::to_string(report).map_err(|e| e.to_string())?;
        println!("{json}");
        return Ok(());
    }
    println!("query        {}", report.query);
    println!(
        "machine      {} ({} cores used)",
        machine.machine, report.cores
    );
    println!("scheduler    {}", report.scheduler);
    print_job(report);
    Ok(())
}

/// The lines of one job's summary, after its query (and the machine).
fn print_job(report: &RunReport) {
    let l = &report.latency_us;
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
    let slo = Duration::from_micros(report.slo_us);
    println!(
        "slo          {slo:?}: {:.3}% of output rows took longer",
        report.slo_violation_pct
    );
    println!(
        "scheduling   {} messages, {} past their deadline (SLO {slo:?}), queueing p99 {} us, {} stalled turns",
        report.messages, report.deadline_misses, report.queue_us_p99, report.stalls
    );
    match report.scale_actions {
        Some(actions) => println!("autoscaler   {actions} actions on this job"),
        None => println!("autoscaler   off"),
    }
    println!(
        "idle         {} actors deactivated while idle (their state kept for their next message)",
        report.deactivations
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

/// The summary of a run of several jobs: one JSON object with a `jobs` array,
/// or one block per job; an error (exit status 1) if any job failed.
fn print_jobs(
    specs: &[JobSpec],
    outcomes: &[Outcome],
    machine: &Machine,
    cores: usize,
    scheduler: &PolicyKind,
    json: bool,
) -> Result<(), String> {
    let failed = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Failed(_)))
        .count();
    if json {
        let jobs: Vec<serde_json::Value> = specs
            .iter()
            .zip(outcomes)
            .map(|(spec, outcome)| {
                let mut entry = match outcome {
                    Outcome::Ran(report) => serde_json::to_value(report).expect("a report is JSON"),
                    Outcome::Failed(error) => serde_json::json!({ "error": error }),
                    Outcome::Finished(message) => serde_json::json!({ "finished": message }),
                };
                entry["job"] = spec.text.clone().into();
                entry["query"] = spec.query.clone().into();
                entry
            })
            .collect();
        let summary = serde_json::json!({
            "jobs": jobs,
            "shards": cores,
            "scheduler": scheduler.name(),
            "machine": machine.machine,
            "failed": failed,
        });
        println!("{summary}");
    } else {
        println!("machine      {} ({cores} cores used)", machine.machine);
        println!("scheduler    {}", scheduler.name());
        println!("jobs         {} ({failed} failed)", specs.len());
        for (i, (spec, outcome)) in specs.iter().zip(outcomes).enumerate() {
            println!();
            println!("job {:<9}{}", i + 1, spec.text);
            println!("query        {}", spec.query);
            match outcome {
                Outcome::Ran(report) => print_job(report),
                Outcome::Failed(error) => println!("failed       {error}"),
                Outcome::Finished(message) => println!("finished     {message}"),
            }
        }
    }
    match failed {
        0 => Ok(()),
        _ => Err(format!("{failed} of {} jobs failed", specs.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(text: &str) -> Vec<(u64, u64)> {
        match parse_rate(text) {
            Ok(Rate::Paced(schedule)) => {
                schedule.steps().map(|s| (s.per_s, s.duration_ms)).collect()
            }
            Ok(Rate::Max) => panic!("{text} parsed as max"),
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn rates_and_schedules_parse() {
        assert!(matches!(parse_rate("max"), Ok(Rate::Max)));
        assert_eq!(schedule("200000"), vec![(200_000, u64::MAX)]);
        assert_eq!(
            schedule("50000/1s,3000000/2s,50000/2s"),
            vec![(50_000, 1000), (3_000_000, 2000), (50_000, u64::MAX)]
        );
        assert_eq!(
            schedule("10/300ms,20/0.3s,5"),
            vec![(10, 300), (20, 300), (5, u64::MAX)]
        );
        // A pause: rate 0 for a while.
        assert_eq!(
            schedule("100/1s,0/2s,100"),
            vec![(100, 1000), (0, 2000), (100, u64::MAX)]
        );
        // The canonical form parses back to the same schedule.
        for text in [
            "200000",
            "50000/1s,3000000/1500ms,50000",
            "50000/1s,0/2s,50000",
        ] {
            let Ok(Rate::Paced(parsed)) = parse_rate(text) else {
                panic!("{text}");
            };
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let cases: &[(&str, &[&str])] = &[
            ("0/1s", &["rate 0", "never end"]),
            ("0", &["\"0\" is not a rate"]),
            ("abc", &["\"abc\" is not a rate", "schedule"]),
            ("100/", &["\"\" is not a duration"]),
            ("100/0s,5", &["step 1", "above zero"]),
            ("100/1s,0/1s", &["step 2", "rate 0", "never end"]),
            ("100/1s,0,5", &["step 2", "\"0\" is not a rate"]),
            ("100,5", &["step 1", "no duration"]),
            ("100/1s,", &["step 2", "\"\" is not a rate"]),
            ("100/1500us,5", &["step 1", "whole number of milliseconds"]),
            ("100/1x,5", &["step 1", "unknown unit"]),
        ];
        for (text, words) in cases {
            let error = match parse_rate(text) {
                Err(e) => e,
                Ok(rate) => panic!("{text} parsed as {rate:?}"),
            };
            for word in words.iter() {
                assert!(error.contains(word), "{text}: {word:?} not in {error}");
            }
        }
    }

    #[test]
    fn a_job_string_parses_like_the_single_job_form() {
        let spec = parse_job("q5 --rate 50000/1s,200 --slo 2s --sink 'file:a b.jsonl'").unwrap();
        assert_eq!(spec.query, "q5");
        assert_eq!(
            spec.text,
            "q5 --rate 50000/1s,200 --slo 2s --sink 'file:a b.jsonl'"
        );
        assert_eq!(spec.args.slo, Duration::from_secs(2));
        assert!(matches!(&spec.args.sink, SinkArg::File(p) if p == Path::new("a b.jsonl")));
        assert_eq!(
            spec.args.events, 10_000_000,
            "the single-job form's default"
        );
        let error = parse_job("q5 --scheduler fifo").unwrap_err();
        assert!(error.contains("--scheduler"), "{error}");
        let error = parse_job("").unwrap_err();
        assert!(error.contains("QUERY"), "{error}");
    }
}

/// `dirigo run`'s command line alone, to check a cluster job's flags.
#[derive(clap::Parser, Debug)]
#[command(name = "dirigo run", no_binary_name = true)]
struct RunLine {
    #[command(flatten)]
    args: RunArgs,
}

/// Check `dirigo run QUERY FLAGS` as a cluster job: the flags parse as
/// run's, name one job, keep checkpoints (the job resumes from them on
/// another node), never discard them, and write rows where every node
/// reaches them.
pub fn check_cluster_job(query: &str, flags: &[String]) -> Result<(), String> {
    let mut words = vec![query.to_string()];
    words.extend(flags.iter().cloned());
    let line = <RunLine as clap::Parser>::try_parse_from(&words).map_err(|e| {
        let rendered = e.render().to_string();
        rendered
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
    })?;
    let args = line.args;
    if !args.jobs.is_empty() {
        return Err("a cluster job is one query: submit each --job on its own".into());
    }
    dirigo_nexmark::queries::check(query)?;
    if args.job.data_dir.is_none() {
        return Err(
            "a cluster job needs --data-dir, on storage every node reaches: it resumes from \
             its checkpoints there on another node"
                .into(),
        );
    }
    if args.job.fresh {
        return Err("a cluster job resumes from its checkpoints: --fresh is refused".into());
    }
    if args.job.fence_epoch.is_some() {
        return Err("--fence-epoch is the node's to set".into());
    }
    if !args.nodes.is_empty() || args.node.is_some() || args.secret_file.is_some() {
        return Err(
            "--nodes, --node and --secret-file are the cluster's to set: a job runs over \
             the nodes it is placed on"
                .into(),
        );
    }
    if matches!(args.job.sink, SinkArg::Stdout) {
        return Err("a cluster job writes rows to file:PATH (or null), not stdout".into());
    }
    if args.cores.is_none() {
        return Err(
            "a cluster job names its --cores: its shards over all the nodes it runs on (it \
             runs on as many nodes as divide them, and resumes only on as many shards)"
                .into(),
        );
    }
    Ok(())
}

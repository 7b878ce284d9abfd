//! `dirigo run <query>`: one Nexmark query on an embedded single-node engine, with
//! progress on stderr and a summary (or, with `--json`, one JSON line) on stdout.

use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;

use dirigo_engine::dataflow::graph::SinkFactory;
use dirigo_engine::dataflow::Sink;
use dirigo_nexmark::queries::{EventSource, NullSink, Row};
use dirigo_nexmark::run::{run_query, RunConfig};
use dirigo_nexmark::GeneratorConfig;

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
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
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

/// Writes rows as JSON Lines; the first write error is kept and reported after the run.
struct WriterSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    error: Arc<Mutex<Option<String>>>,
    target: String,
}

impl Sink<Row> for WriterSink {
    fn write(&mut self, records: &[Row]) {
        if self.error.lock().expect("sink error lock").is_some() {
            return;
        }
        self.line.clear();
        for row in records {
            row.write_json_line(&mut self.line);
        }
        if let Err(e) = self.out.write_all(&self.line) {
            *self.error.lock().expect("sink error lock") =
                Some(format!("cannot write to {}: {e}", self.target));
        }
    }

    fn finish(&mut self) {
        if let Err(e) = self.out.flush() {
            let mut error = self.error.lock().expect("sink error lock");
            error.get_or_insert(format!("cannot write to {}: {e}", self.target));
        }
    }
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
                config.events_per_second = rate;
            }
            EventSource::Generator {
                config,
                events: args.events,
            }
        }
        SourceArg::File(path) => {
            std::fs::File::open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let path = path.clone();
            EventSource::Reader {
                open: Arc::new(move || -> Box<dyn std::io::BufRead + Send> {
                    match std::fs::File::open(&path) {
                        Ok(file) => Box::new(BufReader::with_capacity(1 << 20, file)),
                        // Checked above; if it vanished since, the source reads nothing.
                        Err(_) => Box::new(std::io::empty()),
                    }
                }),
                skip_malformed: args.skip_malformed,
            }
        }
    };
    let error = Arc::new(Mutex::new(None));
    let (sink, sink_parallelism): (SinkFactory<Row>, u32) = match &args.sink {
        SinkArg::Null => (Arc::new(|_| Box::new(NullSink)), cores as u32),
        SinkArg::Stdout => {
            let error = error.clone();
            (
                Arc::new(move |_| {
                    Box::new(WriterSink {
                        out: Box::new(std::io::BufWriter::new(std::io::stdout())),
                        line: Vec::new(),
                        error: error.clone(),
                        target: "stdout".into(),
                    })
                }),
                1,
            )
        }
        SinkArg::File(path) => {
            let file = std::fs::File::create(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let file = Arc::new(Mutex::new(Some(file)));
            let error = error.clone();
            let target = path.display().to_string();
            (
                Arc::new(move |_| {
                    let file = file.lock().expect("sink file lock").take();
                    let out: Box<dyn Write + Send> = match file {
                        Some(file) => Box::new(std::io::BufWriter::with_capacity(1 << 20, file)),
                        None => Box::new(std::io::sink()),
                    };
                    Box::new(WriterSink {
                        out,
                        line: Vec::new(),
                        error: error.clone(),
                        target: target.clone(),
                    })
                }),
                1,
            )
        }
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
        sink,
        sink_parallelism,
        rate_events_per_s: rate,
        slo: args.slo,
        progress: Some(progress),
        time_limit: Duration::from_secs(24 * 3600),
    })
    .map_err(|e| e.to_string())?;
    if started.elapsed() >= Duration::from_secs(1) {
        eprintln!();
    }
    if let Some(error) = error.lock().expect("sink error lock").take() {
        return Err(error);
    }
    let machine = dirigo_bench::machine::Machine::detect();
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
            "latency      p50 {} us, p99 {} us, p99.9 {} us, max {} us",
            l.p50, l.p99, l.p999, l.max
        );
        println!(
            "scheduling   {} messages, {} past their deadline (SLO {:?}), queueing p99 {} us, {} stalled turns",
            report.messages, report.deadline_misses, args.slo, report.queue_us_p99, report.stalls
        );
    }
    Ok(())
}

//! `dirigo bench <name>`: parse the flags into the workload's `Config`, run it,
//! and print its report as a table or, with `--json`, as one JSON line.

use clap::{Args, Subcommand};
use serde::Serialize;

use std::path::PathBuf;

use dirigo_bench::{
    actors, checkpoint, density, ingest, isolation, migrate, net, nexmark, relays, scaling,
    BenchError,
};

use super::run::parse_duration;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    name: BenchName,
}

#[derive(Subcommand, Debug)]
enum BenchName {
    /// Messages per second between two actors (one shard, two shards, batched)
    /// against glommio's raw channel mesh between the same two cores sending the
    /// same messages (one payload each, or the same batches).
    Actors {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Messages the receiver counts in each measurement.
        #[arg(long, default_value_t = 20_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        messages: u64,
        /// Measurements per figure; the median is reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
    },
    /// Messages from one node process to another over loopback through the
    /// session (handshake, tagged link frames, acks, credit) against a raw
    /// TCP stream carrying the same bodies in the same frames and writes;
    /// each receiver checks every message (lost, duplicated, out of order).
    Net {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Messages sent in each measurement.
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        messages: u64,
        /// Bytes of each message's body.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(8..=16_777_216))]
        message_bytes: u64,
        /// Measurements of each kind; the medians are reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
    },
    /// The receiving process of `bench net` (started by it).
    #[command(hide = true)]
    NetPeer {
        #[arg(long)]
        mode: net::Mode,
        #[arg(long)]
        messages: u64,
        #[arg(long)]
        message_bytes: u64,
        /// `--mode actors`: where node 0's gateway listens.
        #[arg(long)]
        node0: Option<std::net::SocketAddr>,
    },
    /// A keyed count over `--keys` keys with a checkpoint every second against
    /// the same job without (B, C, B, C), then the recovery of the stopped job
    /// from its data directory and the exact per-key check of its counts.
    Checkpoint {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Keys of the count (16 encoded bytes of state each).
        #[arg(long, default_value_t = 7_000_000, value_parser = clap::value_parser!(u64).range(1_000..=1_000_000_000))]
        keys: u64,
        /// Seconds of each throughput window.
        #[arg(long, default_value_t = 6.0)]
        seconds: f64,
        /// Shards (cores); default: every online core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        cores: Option<u64>,
    },
    /// The most identical paced q2 jobs that all keep their SLO, time-shared
    /// over every core (EDF, autoscaler) and with one core per job (FIFO),
    /// found by doubling then bisection; their ratio.
    Density {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Runs, each searching both ways; the medians are reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Shards (cores); default: every online core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        cores: Option<u64>,
        /// Each job's input rate, events/s.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        rate: u64,
        /// How long each job's input lasts, ms.
        #[arg(long, default_value_t = 1_500, value_parser = clap::value_parser!(u64).range(1..=600_000))]
        run_ms: u64,
        /// Each job's SLO, e.g. `10ms`.
        #[arg(long, default_value = "10ms", value_parser = parse_duration)]
        slo: std::time::Duration,
        /// The time-shared search stops at this many jobs.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        jobs_max: u64,
    },
    /// The parallel file source (JSON Lines to events on every core) against a
    /// bare read of the same file through the same reader.
    Ingest {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// The JSON Lines file to read; default: generate `--events` into a temporary file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Events to generate when no file is given.
        #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        events: u64,
        /// Shards (cores); default: every online core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        cores: Option<u64>,
        /// Measurements per figure; the median is reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
    },
    /// A latency-critical job (q1, paced) next to a bulk job (q5) whose input
    /// bursts far above what the cores do, under FIFO with the autoscaler off
    /// (the baseline) and under EDF with the autoscaler (Dirigo), alternated:
    /// the LC job's SLO violations and p99, its rows, the bulk throughput.
    Isolation {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Runs, each measuring both configurations; the medians are reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Shards (cores); default: every online core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        cores: Option<u64>,
        /// The latency-critical job's input rate, events/s.
        #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
        lc_rate: u64,
        /// The latency-critical job's input events (cover the bulk job's burst).
        #[arg(long, default_value_t = 1_400_000, value_parser = clap::value_parser!(u64).range(1..))]
        lc_events: u64,
        /// The latency-critical job's SLO, e.g. `2ms`, `10ms` (at 2 ms the
        /// baseline misses it on 13-25% of rows on two cores: the workload's
        /// sizing; at 10 ms on 0.8-2.1%).
        #[arg(long, default_value = "2ms", value_parser = parse_duration)]
        lc_slo: std::time::Duration,
        /// The bulk job's input rate during its burst, events/s (50,000 outside it).
        #[arg(long, default_value_t = 30_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        burst_rate: u64,
        /// How long the burst lasts in the bulk job's schedule, ms.
        #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
        burst_ms: u64,
        /// The bulk job's input events; default: its whole schedule (1 s quiet,
        /// the burst, 1 s quiet).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        bulk_events: Option<u64>,
    },
    /// Pause of a live migration of an actor with 1 MiB of state under load, and
    /// the exactly-once, in-order check of every message.
    Migrate {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Moves of the actor between shard 0 and shard 1.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        migrations: u64,
    },
    /// A job whose cost is a step fused into its one source partition, with
    /// the autoscaler on: the step kept fused (the baseline) against the
    /// autoscaler free to split it out onto relays; every run's rows equal.
    Relays {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Runs, each measuring both configurations; the medians are reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Shards (cores); default: every online core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        cores: Option<u64>,
        /// Numbers the source makes.
        #[arg(long, default_value_t = 4_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        events: u64,
        /// Rounds of splitmix64 the step spends on each number.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        rounds: u32,
    },
    /// A paced q2 whose input steps up (4x), back down, pauses and resumes,
    /// with the autoscaler off (the baseline) and on, alternated: the window
    /// p99's reaction to the step, scale actions, every row checked against
    /// the baseline's, CPU while idle, time to the first row after the pause.
    Scaling {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Runs, each measuring both configurations; the medians are reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Shards (cores); default: every online core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        cores: Option<u64>,
        /// The steady input rate, events/s.
        #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        rate: u64,
        /// The step's rate over the steady rate.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
        step_factor: u64,
        /// How long the step (and the steady phase before it) lasts, ms; the
        /// steady phase after it and the tail last half that.
        #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(2..=600_000))]
        step_ms: u64,
        /// How long the input pauses, ms.
        #[arg(long, default_value_t = 2_500, value_parser = clap::value_parser!(u64).range(4..=600_000))]
        pause_ms: u64,
        /// The job's SLO, e.g. `10ms`.
        #[arg(long, default_value = "10ms", value_parser = parse_duration)]
        slo: std::time::Duration,
    },
    /// Each Nexmark query at full speed (events/s, per core, against the bare
    /// generator) and paced at half that rate for latency.
    Nexmark {
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Events per full-speed run.
        #[arg(long, default_value_t = 20_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        events: u64,
        /// Shards (cores); default: every online core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        cores: Option<u64>,
        /// Queries to run, comma-separated.
        #[arg(long, default_value = "q0,q1,q2,q3,q4,q5,q7,q8", value_delimiter = ',')]
        queries: Vec<String>,
        /// Seconds of paced input for the latency figures.
        #[arg(long, default_value_t = 2.0)]
        latency_seconds: f64,
    },
}

pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    match args.name {
        BenchName::Actors {
            json,
            messages,
            runs,
        } => {
            let config = actors::Config {
                messages,
                runs: runs as usize,
                ..actors::Config::default()
            };
            print(&actors::run(&config)?, json);
            Ok(())
        }
        BenchName::Checkpoint {
            json,
            keys,
            seconds,
            cores,
        } => {
            let config = checkpoint::Config {
                keys,
                seconds: seconds.clamp(0.5, 3600.0),
                cores: cores.map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize),
                ..checkpoint::Config::default()
            };
            print(&checkpoint::run(&config)?, json);
            Ok(())
        }
        BenchName::Density {
            json,
            runs,
            cores,
            rate,
            run_ms,
            slo,
            jobs_max,
        } => {
            let config = density::Config {
                cores: cores.map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize),
                runs: runs as usize,
                rate_per_s: rate,
                run_ms,
                slo,
                jobs_max: jobs_max as usize,
                ..density::Config::default()
            };
            print(&density::run(&config)?, json);
            Ok(())
        }
        BenchName::Ingest {
            json,
            file,
            events,
            cores,
            runs,
        } => {
            let config = ingest::Config {
                file,
                events,
                cores: cores.map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize),
                runs: runs as usize,
                ..ingest::Config::default()
            };
            print(&ingest::run(&config)?, json);
            Ok(())
        }
        BenchName::Isolation {
            json,
            runs,
            cores,
            lc_rate,
            lc_events,
            lc_slo,
            burst_rate,
            burst_ms,
            bulk_events,
        } => {
            let config = isolation::Config {
                cores: cores.map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize),
                runs: runs as usize,
                lc_rate_per_s: lc_rate,
                lc_events,
                lc_slo,
                burst_rate_per_s: burst_rate,
                burst_ms,
                bulk_events,
                ..isolation::Config::default()
            };
            let report = isolation::run(&config)?;
            print(&report, json);
            if report.rows_delivered() {
                Ok(())
            } else {
                Err(BenchError(format!(
                    "the latency-critical job did not deliver exactly its {} rows in every run",
                    report.lc_rows_expected
                )))
            }
        }
        BenchName::Net {
            json,
            messages,
            message_bytes,
            runs,
        } => {
            let config = net::Config {
                messages,
                message_bytes: message_bytes as usize,
                runs: runs as usize,
                ..net::Config::default()
            };
            let report = net::run(&config)?;
            print(&report, json);
            if report.exact() {
                Ok(())
            } else {
                Err(BenchError(format!(
                    "messages were lost ({}), duplicated ({}), reordered ({}) or damaged ({})",
                    report.lost, report.duplicated, report.out_of_order, report.damaged
                )))
            }
        }
        BenchName::NetPeer {
            mode,
            messages,
            message_bytes,
            node0,
        } => {
            net::peer(mode, messages, message_bytes as usize, node0)?;
            Ok(())
        }
        BenchName::Migrate { json, migrations } => {
            let config = migrate::Config {
                migrations,
                ..migrate::Config::default()
            };
            let report = migrate::run(&config)?;
            print(&report, json);
            if report.exactly_once() {
                Ok(())
            } else {
                Err(BenchError(format!(
                    "messages were lost ({}), duplicated ({}) or reordered ({})",
                    report.lost, report.duplicated, report.out_of_order
                )))
            }
        }
        BenchName::Relays {
            json,
            runs,
            cores,
            events,
            rounds,
        } => {
            let config = relays::Config {
                cores: cores.map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize),
                runs: runs as usize,
                events,
                rounds,
                ..relays::Config::default()
            };
            let report = relays::run(&config)?;
            print(&report, json);
            match report.rows_equal {
                true => Ok(()),
                false => Err(BenchError(
                    "the rows differ between runs or configurations".to_string(),
                )),
            }
        }
        BenchName::Scaling {
            json,
            runs,
            cores,
            rate,
            step_factor,
            step_ms,
            pause_ms,
            slo,
        } => {
            let config = scaling::Config {
                cores: cores.map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize),
                runs: runs as usize,
                rate_per_s: rate,
                step_factor,
                step_ms,
                pause_ms,
                slo,
                ..scaling::Config::default()
            };
            let report = scaling::run(&config)?;
            print(&report, json);
            if report.exact() {
                Ok(())
            } else {
                Err(BenchError(format!(
                    "rows were lost ({}) or duplicated ({}) against the baseline's",
                    report.lost, report.duplicated
                )))
            }
        }
        BenchName::Nexmark {
            json,
            events,
            cores,
            queries,
            latency_seconds,
        } => {
            let config = nexmark::SuiteConfig {
                cores: cores.map_or_else(dirigo_engine::runtime::online_cores, |n| n as usize),
                events,
                queries,
                latency_seconds: latency_seconds.clamp(0.1, 600.0),
            };
            let report = nexmark::run_suite(&config)?;
            if json {
                let line = serde_json::to_string(&report).expect("a report serializes to JSON");
                println!("{line}");
            } else {
                println!("machine: {} ({} cores used)", report.machine, report.cores);
                println!(
                    "baseline: bare generator {:.2}M events/s",
                    report.generator_events_per_s / 1e6
                );
                println!("query  events/s     per core     vs generator  latency@50%: p50    p99    p99.9    max (us)");
                for (query, f) in &report.queries {
                    println!(
                        "{query:<6} {:>11.0}  {:>11.0}  {:>11.3}   {:>10} {:>6} {:>8} {:>6}",
                        f.events_per_s,
                        f.events_per_s_per_core,
                        f.generator_ratio,
                        f.latency_us_p50,
                        f.latency_us_p99,
                        f.latency_us_p999,
                        f.latency_us_max
                    );
                }
            }
            Ok(())
        }
    }
}

fn print<R: Serialize + std::fmt::Display>(report: &R, json: bool) {
    if json {
        let line = serde_json::to_string(report).expect("a report serializes to JSON");
        println!("{line}");
    } else {
        println!("{report}");
    }
}

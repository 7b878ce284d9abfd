//! `dirigo bench <name>`: parse the flags into the workload's `Config`, run it,
//! and print its report as a table or, with `--json`, as one JSON line.

use clap::{Args, Subcommand};
use serde::Serialize;

use dirigo_bench::{actors, migrate, BenchError};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    name: BenchName,
}

#[derive(Subcommand, Debug)]
enum BenchName {
    /// Messages per second between two actors (one shard, two shards, batched)
    /// against glommio's raw channel mesh between the same two cores.
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

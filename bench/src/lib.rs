//! Dirigo's benchmark workloads, each measured against its baseline in the same
//! run. The `dirigo bench <name>` subcommands of the binary call these; nothing
//! here is a test, and no timing here decides whether anything passes.
//!
//! - [`actors`]: messages per second between two actors on one shard, across two
//!   shards (one payload per message, and 64 per message as the dataflow sends
//!   them), against glommio's raw channel mesh between the same two cores sending
//!   the same messages (one payload each, or the same 64-payload batches).
//! - [`checkpoint`]: a keyed count holding `keys` entries of state, at full
//!   speed with a checkpoint every second against the same job without, the
//!   checkpoints' duration, alignment and bytes (full and incremental), and the
//!   recovery of the job stopped mid-run from its data directory: time until
//!   every partition runs on its restored state, and the exact per-key check
//!   that nothing was lost or duplicated.
//! - [`density`]: the most identical paced q2 jobs that all keep their SLO,
//!   time-shared over every core (EDF, autoscaler) against static core
//!   partitioning (one job per shard, FIFO), by doubling then bisection.
//! - [`isolation`]: a latency-critical job (q1, paced, tight SLO) next to a
//!   bulk job (q5) whose input bursts far above what the cores can do, under
//!   FIFO with a static placement (the baseline) and under EDF with the
//!   autoscaler (Dirigo): the LC job's SLO violations and p99, its rows all
//!   delivered, and the bulk job's throughput.
//! - [`ingest`]: the parallel file source (JSON Lines to `Event` on every core,
//!   as a dataflow job) against a bare read of the same file by the same reader.
//! - [`scaling`]: a paced q2 whose input steps up 4x, back down, pauses and
//!   resumes, with the autoscaler off (the baseline) and on: how long the
//!   window p99 stays over the SLO after the step, the autoscaler's moves,
//!   every row checked against the baseline's, the process's CPU while the
//!   job idles, and the time to the first row after the pause.
//! - [`relays`]: a job whose cost is a step fused into a source of one
//!   partition, with the step kept fused (the baseline) and with the
//!   autoscaler free to split it out onto relays: throughput, splits, and
//!   the rows of every run equal.
//! - [`migrate`]: the pause of a live migration of an actor with 1 MiB of state,
//!   under a steady stream of messages from both shards, and the exactly-once,
//!   in-order check of every message across 1000 moves.
//!
//! Each workload has a `Config` and a `run(&Config) -> Result<Report, BenchError>`;
//! the `Report` serializes to the JSON object the CLI prints with `--json`, and
//! `Display` renders it as a table. Progress goes to stderr, figures to stdout.
//!
//! Method: every figure is the median of `runs` measurements (3 by default), each
//! on a freshly started runtime, so one noisy run on a shared machine does not
//! decide the figure. The individual samples are in the report too.

pub mod actors;
pub mod checkpoint;
pub mod density;
pub mod failover;
pub mod ingest;
pub mod isolation;
pub use dirigo_nexmark::machine;
pub mod migrate;
pub mod net;
pub mod net_actors;
pub mod nexmark;
pub mod relays;
pub mod scaling;

use std::fmt;

/// Why a benchmark could not produce its figures (a runtime that did not start,
/// or a workload that made no progress within its time limit).
#[derive(Debug)]
pub struct BenchError(pub String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

/// The median of `samples` (the mean of the two middle ones for an even count).
pub fn median(samples: &[f64]) -> f64 {
    assert!(!samples.is_empty(), "median of no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// The median of integer figures, rounded to an integer.
pub fn median_u64(samples: impl IntoIterator<Item = u64>) -> u64 {
    median(&samples.into_iter().map(|s| s as f64).collect::<Vec<_>>()).round() as u64
}

/// Progress line on stderr, when asked for.
pub(crate) fn progress(enabled: bool, line: fmt::Arguments<'_>) {
    if enabled {
        eprintln!("dirigo bench: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        for (samples, expected) in [
            (&[3.0][..], 3.0),
            (&[5.0, 1.0, 3.0][..], 3.0),
            (&[4.0, 1.0, 3.0, 2.0][..], 2.5),
        ] {
            assert_eq!(median(samples), expected, "{samples:?}");
        }
    }
}

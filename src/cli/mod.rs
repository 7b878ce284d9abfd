//! The command line: argument parsing (clap derive) and dispatch to one file per
//! subcommand. Conventions every subcommand keeps: progress on stderr, figures
//! on stdout, and with `--json` the last line of stdout is one JSON object. A bad
//! flag or value is clap's error (naming it) and exit status 2; a failure while
//! running is a one-line error on stderr and exit status 1.

mod bench;
mod cluster;
mod gen;
pub mod run;

pub use run::check_cluster_job;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dirigo_nexmark::run::RunError;

#[derive(Parser, Debug)]
#[command(
    name = "dirigo",
    version,
    about = "Serverless, thread-per-core stream processor on virtual actors"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version.
    Version,
    /// Run a Nexmark query (or several at once, with --job) on an embedded
    /// single-node engine.
    Run(run::RunArgs),
    /// Write Nexmark events as JSON Lines.
    Gen(gen::GenArgs),
    /// Run a benchmark against its baseline, measured in the same run.
    Bench(bench::BenchArgs),
    /// Run a cluster node (long-running; logs to stderr).
    Node(crate::node::NodeArgs),
    /// Submit a job to a cluster; prints its name.
    Submit(cluster::SubmitArgs),
    /// A cluster's nodes and jobs.
    Status(cluster::StatusArgs),
    /// Cancel a cluster's job.
    Cancel(cluster::CancelArgs),
    /// Take a node out of its cluster: its jobs move to the others, then it
    /// leaves the membership and stops.
    Remove(cluster::RemoveArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version => {
            println!("dirigo {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run(args) => match run::run(args) {
            Ok(()) => Ok(()),
            Err(RunError::Failed(error)) => Err(error),
            Err(RunError::PeerLost(error)) => {
                eprintln!("dirigo: {error}");
                return ExitCode::from(run::EXIT_PEER_LOST);
            }
            Err(RunError::PortTaken(error)) => {
                eprintln!("dirigo: {error}");
                return ExitCode::from(run::EXIT_PORT_TAKEN);
            }
        },
        Command::Gen(args) => gen::run(args),
        Command::Bench(args) => bench::run(args).map_err(|e| e.to_string()),
        Command::Node(args) => crate::node::run(args),
        Command::Submit(args) => cluster::submit(args),
        Command::Status(args) => cluster::status(args),
        Command::Cancel(args) => cluster::cancel(args),
        Command::Remove(args) => cluster::remove(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dirigo: {error}");
            ExitCode::FAILURE
        }
    }
}

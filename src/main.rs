//! The `dirigo` binary: a thin command line over the crates. Subcommands live in
//! `cli`, one file each; everything they do is in `dirigo-bench` (and, for the
//! commands to come, `dirigo-engine`).

mod cli;

/// mimalloc for every allocation of the process: the engine allocates message
/// batches on one shard and frees them on another, which mimalloc's per-thread
/// heaps with deferred remote frees handle without a global lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}

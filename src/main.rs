//! The `dirigo` binary: a thin command line over the crates. Subcommands live in
//! `cli`, one file each; everything they do is in `dirigo-bench` (and, for the
//! commands to come, `dirigo-engine`).

mod cli;

/// mimalloc for every allocation of the process: the engine allocates message
/// batches on one shard and frees them on another, which mimalloc's per-thread
/// heaps with deferred remote frees handle without a global lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in the option enum of
/// mimalloc's header (the sys crate names only some options). A test checks
/// it against the option's documented default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed to mimalloc stays with the process, for its next
/// allocations, and is not given back to the OS (mimalloc's default gives
/// back what stayed free for a second, an arena's after ten). A job frees
/// and allocates the same amounts over and over (batches, each checkpoint's
/// encoded groups, a window's tables), and memory given back is faulted in
/// again, zeroed a transparent huge page at a time and at times compacted
/// first. Measured with `dirigo bench checkpoint` (2-core VM, the engine as
/// it is): with mimalloc's default, single snapshot steps of a 256 KiB
/// budget took up to 18 ms, `alignment_ms_p99` was 10.2 and 11.7 ms and
/// restoring 112 MB took about 300 ms; with memory kept, steps stayed under
/// 0.5 ms, alignment p99 was 2.6 to 4.8 ms and the restore 69 to 85 ms. The
/// cost: the process's resident memory is its peak, not its present need.
/// `MIMALLOC_PURGE_DELAY` in the environment overrides it (in ms).
const PURGE_DELAY_MS: std::ffi::c_long = -1;

fn main() -> std::process::ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one option value, read by mimalloc on its own threads
        // as a plain long; any value is valid for this option.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    cli::main()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_mimalloc_documents() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the environment set it: its default is not visible
        }
        // Its default in mimalloc 3 is 1000 (ms); the options before and
        // after it in the enum default to 1 and 0 (deprecated
        // eager_commit_delay, use_numa_nodes). main() is not run in a test.
        let get = |option| unsafe { libmimalloc_sys::mi_option_get(option) };
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 1000);
        assert_eq!(get(MI_OPTION_PURGE_DELAY - 1), 1);
        assert_eq!(get(MI_OPTION_PURGE_DELAY + 1), 0);
    }
}

//! The `dirigo` binary: a thin command line over the crates. Subcommands live in
//! `cli`, one file each; everything they do is in `dirigo-bench` (and, for the
//! commands to come, `dirigo-engine`).

mod cli;
mod node;

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

/// mimalloc's `mi_option_generic_collect`: its place in the option enum (a
/// test checks it against the option's documented default).
const MI_OPTION_GENERIC_COLLECT: libmimalloc_sys::mi_option_t = 34;

/// Allocations on mimalloc's slow path (a page's free list ran out, or any
/// block over 1 KiB) between two collections of the thread's heap, which
/// mimalloc runs inside the allocation that comes next: its largest value
/// (the default is 10,000). Under a burst a million can still come within
/// seconds: the stall is made rarer, not removed.
/// A collection visits every page of the heap that is not full, so its
/// cost grows with the heap, whatever it finds: after a burst of `dirigo
/// bench isolation`'s q5 (half a GiB of window state, then freed as the
/// windows fire) single collections took 7 to 43 ms, a shard's every
/// actor waiting, the latency-critical job's rows among them (in an
/// actor's turn, 63-78 ms were seen). Nothing calls it on a timer either
/// (until this build each shard collected between passes every
/// millisecond, with those same stalls: `bench isolation --lc-slo 3ms`, two
/// invocations of three runs each alternated, the LC job's worst row
/// 9.5-44 ms with it and 2.7-10 ms without it and with this value,
/// violations 0.26-1.51% and 0.00-0.62%; the process's peak memory in four
/// two-job runs the same within 10%). The cost: a page emptied by other
/// threads' frees stays with its thread for blocks of its size, until
/// that thread's allocations of that size come to it, its next
/// collection, or its exit; memory a shard stops using for one size is
/// not reused for another meanwhile. `MIMALLOC_GENERIC_COLLECT` in the
/// environment overrides it.
const GENERIC_COLLECT: std::ffi::c_long = 1_000_000;

/// The process's memory is not backed by transparent huge pages. A job's
/// state grows by many small allocations (hash tables, B-tree nodes, lists
/// per key), and each first touch of a huge page has the kernel zero 2 MiB
/// (on a VM also fault it in on the host), at times after compacting memory
/// to find one: a shard's turn then stalls for milliseconds, whatever its
/// deadline. Measured on the 2-core Intel Xeon VM, `dirigo run <q> --events
/// 20000000 --cores 1`, the build before this against this one, five runs
/// each alternated, medians in M events/s: q0 40.6 / 40.7, q1 42.4 / 43.1,
/// q2 41.1 / 40.4, q3 29.3 / 32.0 (1.09), q4 10.9 / 12.8 (1.18), q5 9.8 /
/// 10.7 (1.10), q7 26.4 / 25.9 (0.98), q8 31.9 / 30.8 (0.96); the runs
/// spread much less without (q5 8.5-10.6 with, 10.4-11.0 without). Turns
/// over 4 ms in one `dirigo bench isolation --runs 1`: 310 with, 43
/// without. The cost: the joins (q7, q8) and `dirigo bench checkpoint`'s
/// random-access count over 7M keys run 2-4% slower (82.7M against 86.0M
/// events/s, one invocation each), as their table lookups miss the TLB
/// more. `MIMALLOC_ALLOW_THP` in the environment
/// overrides it (mimalloc reads it at start: `1` keeps huge pages).
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: sets a flag of this process's memory map; no pointer is
    // passed. A kernel without the option refuses it, and the process runs
    // on as it was.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    for (option, env, value) in [
        (
            MI_OPTION_PURGE_DELAY,
            "MIMALLOC_PURGE_DELAY",
            PURGE_DELAY_MS,
        ),
        (
            MI_OPTION_GENERIC_COLLECT,
            "MIMALLOC_GENERIC_COLLECT",
            GENERIC_COLLECT,
        ),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: sets one option value, read by mimalloc on its own
            // threads as a plain long; any value is valid for these options.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
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

    #[test]
    fn the_generic_collect_option_is_the_one_mimalloc_documents() {
        if std::env::var_os("MIMALLOC_GENERIC_COLLECT").is_some() {
            return;
        }
        // 10,000 by default; the options around it (guarded_sample_seed,
        // page_reclaim_on_free) default to 0.
        let get = |option| unsafe { libmimalloc_sys::mi_option_get(option) };
        assert_eq!(get(MI_OPTION_GENERIC_COLLECT), 10_000);
        assert_eq!(get(MI_OPTION_GENERIC_COLLECT - 1), 0);
        assert_eq!(get(MI_OPTION_GENERIC_COLLECT + 1), 0);
    }
}

//! End-to-end tests of the `dirigo` binary: they run the real executable and
//! check what a user sees (help, version, errors) and what a machine reads (the
//! last line of `--json` output). Benchmarks run tiny here: the figures are not
//! checked, only that they are all there and, for migration, that every message
//! was handled exactly once and in order.

use std::process::{Command, Output};

fn dirigo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dirigo"))
        .args(args)
        .output()
        .expect("the dirigo binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

/// Run a `--json` command and parse the last line of its stdout.
fn json_report(args: &[&str]) -> serde_json::Value {
    let output = dirigo(args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}\n{}",
        output.status,
        stderr(&output)
    );
    let out = stdout(&output);
    let last = out.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

fn assert_keys(report: &serde_json::Value, keys: &[&str]) {
    for key in keys {
        assert!(report.get(key).is_some(), "no {key} in {report}");
    }
}

#[test]
fn help_lists_the_subcommands() {
    for args in [
        &["--help"][..],
        &["bench", "--help"],
        &["bench", "actors", "--help"],
    ] {
        let output = dirigo(args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(stdout(&output).contains("Usage: dirigo"), "{args:?}");
    }
    let help = stdout(&dirigo(&["--help"]));
    for subcommand in ["version", "bench"] {
        assert!(
            help.contains(subcommand),
            "{subcommand} missing from {help}"
        );
    }
}

#[test]
fn version_prints_the_version() {
    let output = dirigo(&["version"]);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output).trim(),
        format!("dirigo {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_flags_and_values_fail_naming_them() {
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "actors", "--bogus"], "--bogus"),
        (&["bench", "actors", "--messages", "lots"], "--messages"),
        (&["bench", "actors", "--messages", "0"], "--messages"),
        (&["bench", "migrate", "--migrations", "-3"], "-3"),
        (&["bench", "nonsense"], "nonsense"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, named) in cases {
        let output = dirigo(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&output).contains(named),
            "{args:?}: error does not name {named}: {}",
            stderr(&output)
        );
        assert!(stdout(&output).is_empty(), "{args:?} wrote to stdout");
    }
}

#[test]
fn bench_actors_json_has_every_figure() {
    let report = json_report(&["bench", "actors", "--json", "--messages", "200000"]);
    assert_keys(
        &report,
        &[
            "local_msgs_per_s",
            "cross_shard_msgs_per_s",
            "cross_shard_batched_msgs_per_s",
            "raw_mesh_msgs_per_s",
            "cross_shard_ratio",
            "cross_shard_batched_ratio",
            "cores",
            "machine",
        ],
    );
    assert_eq!(report["messages"], 200_000);
}

#[test]
fn bench_migrate_json_reports_pauses_and_no_loss_duplicate_or_reorder() {
    let report = json_report(&["bench", "migrate", "--json", "--migrations", "20"]);
    assert_keys(
        &report,
        &[
            "pause_us_p50",
            "pause_us_p99",
            "pause_us_max",
            "messages",
            "lost",
            "duplicated",
            "out_of_order",
        ],
    );
    assert_eq!(report["migrations_completed"], 20, "{report}");
    assert!(report["messages"].as_u64().unwrap() > 0, "{report}");
    for key in ["lost", "duplicated", "out_of_order"] {
        assert_eq!(report[key], 0, "{key} in {report}");
    }
}

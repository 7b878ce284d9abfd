//! End-to-end tests of the `dirigo` binary: they run the real executable and
//! check what a user sees (help, version, errors) and what a machine reads (the
//! last line of `--json` output). Benchmarks run tiny here: the figures are not
//! checked, only that they are all there and, for migration, that every message
//! was handled exactly once and in order.

mod reference;

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
            "raw_mesh_batched_msgs_per_s",
            "cross_shard_ratio",
            "cross_shard_batched_ratio",
            "cores",
            "machine",
        ],
    );
    assert_eq!(report["messages"], 200_000);
}

#[test]
fn bench_checkpoint_json_has_every_figure_and_loses_nothing() {
    let report = json_report(&[
        "bench",
        "checkpoint",
        "--json",
        "--keys",
        "20000",
        "--seconds",
        "1.5",
    ]);
    assert_keys(
        &report,
        &[
            "throughput_ratio",
            "events_per_s_without",
            "events_per_s_with",
            "checkpoint_ms_p50",
            "checkpoint_ms_p99",
            "alignment_ms_p99",
            "state_bytes",
            "checkpoint_bytes",
            "incremental_bytes",
            "recovery_ms",
            "lost",
            "duplicated",
            "cores",
            "machine",
        ],
    );
    // Exactness after the restore is checked against every key's count.
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert!(report["state_bytes"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn bench_isolation_json_has_every_figure_and_delivers_every_lc_row() {
    let report = json_report(&[
        "bench",
        "isolation",
        "--json",
        "--runs",
        "1",
        "--lc-events",
        "20000",
        "--bulk-events",
        "300000",
        "--burst-rate",
        "3000000",
    ]);
    assert_keys(
        &report,
        &[
            "baseline",
            "dirigo",
            "violation_ratio",
            "bulk_throughput_ratio",
            "lc_rows_expected",
            "scale_actions",
            "samples",
            "workload",
            "cores",
            "machine",
        ],
    );
    // q1 makes one row per bid: 46 of every 50 events.
    assert_eq!(report["lc_rows_expected"], 18_400, "{report}");
    for config in ["baseline", "dirigo"] {
        let figures = &report[config];
        for key in ["lc_p99_us", "lc_violation_pct", "bulk_events_per_s"] {
            assert!(figures[key].is_number(), "{config}.{key} in {report}");
        }
        // A correctness check, not a timing: no LC row lost or duplicated.
        assert_eq!(figures["lc_rows"], 18_400, "{config} in {report}");
        let sample = &report["samples"][0][config];
        assert_eq!(sample["lc_rows"], 18_400, "{config} sample in {report}");
    }
    assert_eq!(report["baseline"]["scheduler"], "fifo", "{report}");
    assert_eq!(report["dirigo"]["scheduler"], "edf", "{report}");
    assert!(report["dirigo"]["scale_actions"].is_u64(), "{report}");
    assert!(report["scale_actions"].is_u64(), "{report}");
    assert!(report["bulk_throughput_ratio"].is_number(), "{report}");
    // A number, or null when dirigo had no violation at all.
    let ratio = &report["violation_ratio"];
    assert!(ratio.is_number() || ratio.is_null(), "{report}");
    assert_eq!(
        report["samples"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
}

#[test]
fn bench_scaling_json_has_every_figure_and_loses_no_row() {
    let report = json_report(&[
        "bench",
        "scaling",
        "--json",
        "--runs",
        "1",
        "--rate",
        "100000",
        "--step-ms",
        "300",
        "--pause-ms",
        "600",
    ]);
    assert_keys(
        &report,
        &[
            "reaction_ms",
            "p99_before_us",
            "p99_during_us",
            "scale_out_actions",
            "lost",
            "duplicated",
            "idle_cpu_pct",
            "wake_ms",
            "rows_reference",
            "baseline",
            "dirigo",
            "samples",
            "workload",
            "cores",
            "machine",
        ],
    );
    assert_eq!(
        report["workload"]["schedule"], "100000/300ms,400000/300ms,100000/150ms,0/600ms,100000",
        "{report}"
    );
    // q2 keeps bids on every 123rd auction: some rows, far fewer than events.
    let rows = report["rows_reference"].as_u64().unwrap();
    assert!(rows > 0 && rows < 2_000, "{report}");
    // A correctness check, not a timing: every row of the baseline, once.
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    for config in ["baseline", "dirigo"] {
        let figures = &report[config];
        assert_eq!(figures["rows"], rows, "{config} in {report}");
        for key in [
            "p99_before_us",
            "p99_during_us",
            "idle_cpu_pct",
            "slo_violation_pct",
        ] {
            assert!(figures[key].is_number(), "{config}.{key} in {report}");
        }
    }
    assert!(report["dirigo"]["scale_out_actions"].is_u64(), "{report}");
    assert!(
        report["baseline"].get("scale_out_actions").is_none(),
        "{report}"
    );
}

#[test]
fn bench_density_json_has_every_figure() {
    let report = json_report(&[
        "bench",
        "density",
        "--json",
        "--runs",
        "1",
        "--run-ms",
        "300",
        "--jobs-max",
        "2",
        "--cores",
        "1",
    ]);
    assert_keys(
        &report,
        &[
            "time_shared_jobs",
            "static_jobs",
            "ratio",
            "samples",
            "events_per_job",
            "cores",
            "machine",
        ],
    );
    // Static partitioning gives each job a core of its own: one core, at most one job.
    assert!(report["static_jobs"].as_f64().unwrap() <= 1.0, "{report}");
    assert!(
        report["time_shared_jobs"].as_f64().unwrap() <= 2.0,
        "{report}"
    );
    let ratio = &report["ratio"];
    assert!(ratio.is_number() || ratio.is_null(), "{report}");
    let sample = &report["samples"][0];
    for search in ["time_shared", "static"] {
        assert!(
            sample[search]["probes"]
                .as_array()
                .is_some_and(|p| !p.is_empty()),
            "{report}"
        );
    }
}

#[test]
fn bench_relays_json_has_every_figure_and_equal_rows() {
    let report = json_report(&[
        "bench", "relays", "--json", "--runs", "1", "--events", "300000", "--cores", "2",
    ]);
    assert_keys(
        &report,
        &[
            "fused_events_per_s",
            "relays_events_per_s",
            "ratio",
            "unchain_actions",
            "rechain_actions",
            "rows_equal",
            "rows",
            "fused_samples",
            "relays_samples",
            "events",
            "rounds",
            "runs",
            "cores",
            "machine",
        ],
    );
    assert_eq!(report["rows_equal"], true, "{report}");
    // 300,000 numbers are 3 windows of 100 ms; each has every key of 1,000.
    assert_eq!(report["rows"], 3_000, "{report}");
    for key in ["fused_events_per_s", "relays_events_per_s", "ratio"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
    assert!(report["unchain_actions"].is_u64(), "{report}");
    assert!(report["rechain_actions"].is_u64(), "{report}");
}

#[test]
fn bench_ingest_json_has_every_figure_and_reads_every_event() {
    let report = json_report(&[
        "bench", "ingest", "--json", "--events", "20000", "--runs", "1",
    ]);
    assert_keys(
        &report,
        &[
            "events_per_s",
            "bytes_per_s",
            "read_bytes_per_s",
            "parse_ratio",
            "cores",
            "machine",
            "bytes",
            "events",
        ],
    );
    assert_eq!(report["events"], 20_000, "{report}");
    for key in [
        "events_per_s",
        "bytes_per_s",
        "read_bytes_per_s",
        "parse_ratio",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
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
            "idle_before_us_p99",
            "transfer_us_p99",
            "messages",
            "lost",
            "duplicated",
            "out_of_order",
        ],
    );
    assert_eq!(report["migrations_completed"], 20, "{report}");
    // Recorded for every migration (at least 1 us each): a figure that can vary.
    assert!(
        report["idle_before_us_p99"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(report["messages"].as_u64().unwrap() > 0, "{report}");
    for key in ["lost", "duplicated", "out_of_order"] {
        assert_eq!(report[key], 0, "{key} in {report}");
    }
}

#[test]
fn run_json_reports_the_figures() {
    let report = json_report(&["run", "q2", "--events", "200000", "--cores", "2", "--json"]);
    assert_keys(
        &report,
        &[
            "query",
            "events",
            "elapsed_s",
            "events_per_s",
            "outputs",
            "late",
            "latency_us",
        ],
    );
    assert_eq!(report["query"], "q2");
    assert_eq!(report["late"], 0, "in-order input has no late records");
    assert_eq!(report["events"], 200_000);
    for key in ["p50", "p99", "p999", "max"] {
        assert!(
            report["latency_us"].get(key).is_some(),
            "no latency_us.{key}"
        );
    }
}

/// 30,000 events of `seed` at 1,000 events/s written by `gen` to a file in
/// `dir` (made if need be): its path, and the events read back.
fn generated_file(
    dir: &std::path::Path,
    seed: u64,
) -> (std::path::PathBuf, Vec<dirigo_nexmark::Event>) {
    std::fs::create_dir_all(dir).expect("temp dir");
    let events = dir.join("events.jsonl");
    let gen = dirigo(&[
        "gen",
        "--events",
        "30000",
        "--seed",
        &seed.to_string(),
        "--rate",
        "1000",
        "--out",
        events.to_str().unwrap(),
    ]);
    assert!(gen.status.success(), "gen failed: {}", stderr(&gen));
    let text = std::fs::read_to_string(&events).expect("events written");
    let input: Vec<dirigo_nexmark::Event> = dirigo_nexmark::EventReader::new(text.as_bytes())
        .map(|e| e.expect("gen writes valid events"))
        .collect();
    assert_eq!(input.len(), 30_000);
    (events, input)
}

/// `gen` writes a file, `run` reads it back and writes the rows: the rows equal
/// the plain reference implementation's on the same events.
#[test]
fn gen_then_run_from_a_file_to_a_file_gives_the_reference_rows() {
    let dir = std::env::temp_dir().join(format!("dirigo-cli-{}", std::process::id()));
    let (events, input) = generated_file(&dir, 3);
    let rows = dir.join("rows.jsonl");
    for query in ["q3", "q5", "q8"] {
        let run = dirigo(&[
            "run",
            query,
            "--source",
            &format!("file:{}", events.display()),
            "--sink",
            &format!("file:{}", rows.display()),
            "--cores",
            "2",
        ]);
        assert!(run.status.success(), "run {query} failed: {}", stderr(&run));
        let actual: Vec<serde_json::Value> = std::fs::read_to_string(&rows)
            .expect("rows written")
            .lines()
            .map(|l| serde_json::from_str(l).expect("rows are JSON"))
            .collect();
        reference::assert_same_rows(&reference::query(query, &input), &actual);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `run` over two processes (`--nodes`, one shard each, over loopback,
/// from a file): each node writes the rows of the sink partitions it ran
/// to its own file (a file sink is one partition, on node 0), and the two
/// files together hold the reference's rows, for a join (q3), a window
/// over one key (q5) and a windowed join (q8). Each node reports its own
/// part: both nodes' sources read some of the file, and their events add
/// up to the file's.
#[test]
fn run_over_two_processes_gives_the_reference_rows() {
    let dir = std::env::temp_dir().join(format!("dirigo-cli-nodes-{}", std::process::id()));
    let (events, input) = generated_file(&dir, 5);
    let secret = dir.join("secret");
    std::fs::write(&secret, "the two nodes' shared secret\n").expect("secret written");
    // A node whose peer never comes gives up (after 30 s), naming it.
    let alone = dirigo(&[
        "run",
        "q0",
        "--events",
        "10",
        "--cores",
        "1",
        "--nodes",
        "127.0.0.1:1,127.0.0.1:2",
        "--node",
        "1",
        "--secret-file",
        secret.to_str().unwrap(),
    ]);
    assert!(!alone.status.success());
    assert!(
        stderr(&alone).contains("node 0 (127.0.0.1:1) did not connect"),
        "{}",
        stderr(&alone)
    );
    for query in ["q3", "q5", "q8"] {
        // Two free loopback ports (released just before the nodes bind them).
        let ports: Vec<u16> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a port"))
            .collect::<Vec<_>>()
            .iter()
            .map(|l| l.local_addr().expect("bound").port())
            .collect();
        let nodes = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
        let rows = |node: usize| dir.join(format!("{query}-{node}.jsonl"));
        let args = |node: usize| -> Vec<String> {
            [
                "run",
                query,
                "--source",
                &format!("file:{}", events.display()),
                "--sink",
                &format!("file:{}", rows(node).display()),
                "--cores",
                "1",
                "--nodes",
                &nodes,
                "--node",
                &node.to_string(),
                "--secret-file",
                secret.to_str().unwrap(),
                "--json",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let second = Command::new(env!("CARGO_BIN_EXE_dirigo"))
            .args(args(1))
            .output_in_background();
        let first = Command::new(env!("CARGO_BIN_EXE_dirigo"))
            .args(args(0))
            .output()
            .expect("node 0 runs");
        let second = second.join().expect("node 1 runs");
        let mut events_in = 0;
        for (node, output) in [(0, &first), (1, &second)] {
            assert!(
                output.status.success(),
                "{query} node {node} failed: {}",
                stderr(output)
            );
            let report: serde_json::Value =
                serde_json::from_str(stdout(output).lines().last().expect("a summary"))
                    .expect("the summary is JSON");
            assert_eq!(report["node"], node, "{report}");
            assert_eq!(report["nodes"], 2, "{report}");
            // Each node's sources read part of the file: node 1's records
            // reach the sink (one partition, on node 0) across the nodes.
            let events = report["events"].as_u64().expect("events");
            assert!(events > 0, "{query} node {node} read nothing: {report}");
            events_in += events;
        }
        assert_eq!(
            events_in, 30_000,
            "{query}: every event read once, over both nodes"
        );
        let actual: Vec<serde_json::Value> = [rows(0), rows(1)]
            .iter()
            .flat_map(|path| {
                std::fs::read_to_string(path)
                    .expect("rows written")
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("rows are JSON"))
                    .collect::<Vec<_>>()
            })
            .collect();
        reference::assert_same_rows(&reference::query(query, &input), &actual);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A command's output, gathered on a thread of its own.
trait OutputInBackground {
    fn output_in_background(&mut self) -> std::thread::JoinHandle<Output>;
}

impl OutputInBackground for Command {
    fn output_in_background(&mut self) -> std::thread::JoinHandle<Output> {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the command starts");
        std::thread::spawn(move || child.wait_with_output().expect("the command ends"))
    }
}

#[test]
fn run_rejects_bad_input_with_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("dirigo-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let events = dir.join("bad.jsonl");
    std::fs::write(&events, "{\"type\":\"bid\",\"auction\":1}\n").expect("written");
    let source = format!("file:{}", events.display());
    let cases: &[(&[&str], &str)] = &[
        (&["run", "q6"], "unknown query"),
        (&["run", "q0", "--source", "kafka"], "kafka"),
        (&["run", "q0", "--sink", "s3:bucket"], "s3:bucket"),
        (&["run", "q0", "--slo", "fast"], "fast"),
        (
            &["run", "q0", "--source", "file:/nonexistent/events.jsonl"],
            "/nonexistent/events.jsonl",
        ),
        (&["run", "q0", "--source", &source], "line 1"),
        (
            &[
                "run",
                "q0",
                "--sink",
                "file:/dev/full",
                "--events",
                "100000",
            ],
            "/dev/full",
        ),
    ];
    for (args, needle) in cases {
        let output = dirigo(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let message = stderr(&output);
        assert!(
            message.contains(needle),
            "{args:?}: {needle:?} not in {message}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn skip_malformed_skips_and_counts_bad_lines() {
    let dir = std::env::temp_dir().join(format!("dirigo-cli-skip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let events = dir.join("mixed.jsonl");
    let gen = dirigo(&["gen", "--events", "100", "--out", events.to_str().unwrap()]);
    assert!(gen.status.success());
    let mut text = std::fs::read_to_string(&events).expect("events");
    text.insert_str(0, "not json\n{\"type\":\"bid\"}\n");
    std::fs::write(&events, text).expect("written");
    let source = format!("file:{}", events.display());
    let report = json_report(&[
        "run",
        "q0",
        "--source",
        &source,
        "--skip-malformed",
        "--json",
    ]);
    assert_eq!(report["skipped"], 2);
    assert_eq!(report["events"], 100);
    std::fs::remove_dir_all(&dir).ok();
}

/// An event time that would end the stream early (i64::MAX, the end-of-input
/// mark) or jump far ahead is an error naming its line; with `--skip-malformed`
/// it is skipped and counted, and every other event still counts.
#[test]
fn bad_event_times_fail_naming_the_line_or_are_skipped_and_counted() {
    let dir = std::env::temp_dir().join(format!("dirigo-cli-time-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let events = dir.join("events.jsonl");
    let gen = dirigo(&["gen", "--events", "1000", "--out", events.to_str().unwrap()]);
    assert!(gen.status.success(), "{}", stderr(&gen));
    let text = std::fs::read_to_string(&events).expect("events");
    let bids = text
        .lines()
        .filter(|l| l.contains("\"type\":\"bid\""))
        .count() as u64;
    let lines: Vec<&str> = text.lines().collect();
    let first_time: i64 = 1_700_000_000_000;
    let cases = [
        ("i64::MAX", i64::MAX.to_string(), "out of range"),
        (
            "ten days ahead",
            (first_time + 10 * 86_400_000).to_string(),
            "max_time_jump_ms",
        ),
    ];
    for (name, time, needle) in cases {
        let bad = format!(
            "{{\"type\":\"bid\",\"auction\":1000,\"bidder\":1001,\"price\":5,\"channel\":\"Apple\",\"url\":\"u\",\"date_time\":{time},\"extra\":\"\"}}"
        );
        let mut with_bad = lines[..500].join("\n");
        with_bad.push('\n');
        with_bad.push_str(&bad);
        with_bad.push('\n');
        with_bad.push_str(&lines[500..].join("\n"));
        with_bad.push('\n');
        let path = dir.join("bad-time.jsonl");
        std::fs::write(&path, with_bad).expect("written");
        let source = format!("file:{}", path.display());
        for cores in ["1", "2"] {
            let output = dirigo(&["run", "q0", "--cores", cores, "--source", &source]);
            assert!(!output.status.success(), "{name}: the run succeeded");
            let message = stderr(&output);
            assert!(
                message.contains("line 501") && message.contains(needle),
                "{name}, {cores} cores: {message}"
            );
            let report = json_report(&[
                "run",
                "q0",
                "--cores",
                cores,
                "--source",
                &source,
                "--skip-malformed",
                "--json",
            ]);
            assert_eq!(report["skipped"], 1, "{name}: {report}");
            assert_eq!(report["events"], 1000, "{name}: {report}");
            assert_eq!(report["outputs"], bids, "{name}: every real bid is output");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn more_cores_than_online_need_oversubscribe() {
    let output = dirigo(&["run", "q0", "--cores", "1024", "--events", "1000"]);
    assert!(!output.status.success(), "1024 shards started");
    let message = stderr(&output);
    assert!(message.contains("--oversubscribe"), "{message}");
    let report = json_report(&[
        "run",
        "q1",
        "--cores",
        "4",
        "--oversubscribe",
        "--events",
        "20000",
        "--json",
    ]);
    assert_eq!(report["cores"], 4);
    assert_eq!(report["events"], 20_000);
}

/// `gen` formats on several threads and writes in order: the file is the same,
/// byte for byte, for 1 and 4 threads, and is `write_json_line` over
/// `Generator::fill(0..events)`. 100,003 events is 49 chunks of 2,048 (the last
/// one short), so every thread formats many chunks and reuses its buffers.
#[test]
fn gen_writes_the_same_bytes_on_any_number_of_threads() {
    let dir = std::env::temp_dir().join(format!("dirigo-cli-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (events, seed, rate) = (100_003u64, 11u64, 1000u64);
    let mut expected = Vec::new();
    let generator = dirigo_nexmark::Generator::new(dirigo_nexmark::GeneratorConfig {
        seed,
        rate: dirigo_engine::dataflow::RateSchedule::constant(rate),
        ..dirigo_nexmark::GeneratorConfig::default()
    })
    .expect("a valid generator config");
    let mut all = Vec::new();
    generator.fill(0..events, &mut all);
    for event in &all {
        dirigo_nexmark::write_json_line(event, &mut expected);
    }
    for threads in ["1", "4"] {
        let path = dir.join(format!("events-{threads}.jsonl"));
        let gen = dirigo(&[
            "gen",
            "--events",
            &events.to_string(),
            "--seed",
            &seed.to_string(),
            "--rate",
            &rate.to_string(),
            "--threads",
            threads,
            "--out",
            path.to_str().unwrap(),
        ]);
        assert!(gen.status.success(), "gen failed: {}", stderr(&gen));
        let written = std::fs::read(&path).expect("events written");
        assert_eq!(written.len(), expected.len(), "{threads} threads: length");
        assert!(
            written == expected,
            "{threads} threads: first difference at byte {}",
            written
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0)
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gen_fails_naming_the_path_and_the_os_error() {
    let cases: &[(&str, &str)] = &[
        (
            "/nonexistent-dirigo-dir/events.jsonl",
            "No such file or directory",
        ),
        ("/dev/full", "No space left on device"),
    ];
    for (path, os_error) in cases {
        let output = dirigo(&["gen", "--events", "100000", "--out", path]);
        assert!(!output.status.success(), "gen --out {path} succeeded");
        let message = stderr(&output);
        assert!(message.contains(path), "{path} not in {message}");
        assert!(message.contains(os_error), "{os_error:?} not in {message}");
    }
}

/// `bench net` starts its peer process, and both ways carry every message
/// once, in order, whole (the peer checks each).
#[test]
fn bench_net_json_has_every_figure_and_every_message_arrives() {
    let report = json_report(&[
        "bench",
        "net",
        "--json",
        "--messages",
        "20000",
        "--runs",
        "1",
    ]);
    assert_keys(
        &report,
        &[
            "cross_node_msgs_per_s",
            "raw_tcp_msgs_per_s",
            "cross_node_ratio",
            "session_msgs_per_s",
            "session_ratio",
            "lost",
            "duplicated",
            "failover_ms",
            "failover_over_nodes_ms",
        ],
    );
    // Each kind measured once: actor messages, the session alone, raw TCP.
    let mut modes: Vec<&str> = report["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| s["mode"].as_str().expect("a mode"))
        .collect();
    modes.sort();
    assert_eq!(modes, ["actors", "link", "raw"], "{report}");
    // The failover was measured, of a job on one node and of one over two.
    for key in ["failover_ms", "failover_over_nodes_ms"] {
        let failover = report[key].as_f64().unwrap();
        assert!(failover > 0.0 && failover < 60_000.0, "{key} in {report}");
    }
    let shards: Vec<u64> = report["failover_samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["shards"].as_u64().unwrap())
        .collect();
    assert_eq!(shards, [1, 2], "{report}");
    for key in ["lost", "duplicated", "out_of_order", "damaged"] {
        assert_eq!(report[key], 0, "{key} in {report}");
    }
    for sample in report["samples"].as_array().expect("samples") {
        assert_eq!(sample["counts"]["received"], 20000, "{sample}");
    }
    assert!(report["cross_node_msgs_per_s"].as_f64().unwrap() > 0.0);
    // A message too large for a link frame is a clear error, not a hang.
    let output = dirigo(&["bench", "net", "--message-bytes", "300000"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--message-bytes"),
        "{}",
        stderr(&output)
    );
}

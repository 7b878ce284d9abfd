//! Kill -9 of the real binary: `dirigo run ... --data-dir DIR` is killed with
//! SIGKILL at random points and run again, as a user would after a crash,
//! until it reports its run finished. After every kill the output file holds
//! only committed rows (a part of the uninterrupted run's rows); at the end it
//! holds exactly the rows of an uninterrupted run of the same command, as a
//! multiset, and those equal the plain reference's (`tests/reference`) over
//! the same events. For q3, q4, q5, q7 and q8, with the file source and with the
//! paced generator, 5 kill points each (seeded, so a failure reproduces).
//! Also: a finished run exits 0 and says so, a different command on the same
//! directory is refused naming the difference, and `--fresh` starts over.

mod reference;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const QUERIES: [&str; 5] = ["q3", "q4", "q5", "q7", "q8"];
const EVENTS: u64 = 300_000;
/// Paced: a run takes about 3 s, so kills land all along it.
const RATE: &str = "100000";
const KILLS: usize = 5;

fn dirigo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dirigo"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dirigo-recovery-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// The whole lines of `path`, sorted: a kill in the middle of appending a
/// committed checkpoint's rows can leave a torn last line, which the next
/// start cuts off before it appends them again.
fn whole_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
    let mut lines: Vec<String> = whole.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// q4's rows are running averages, whose intermediate values depend on the
/// order in which closings from different partitions interleave (NEXMARK.md):
/// what is compared is, per category, the number of updates (one per closed
/// auction: none lost, none repeated) and the last one (the final average, as
/// each category's updates reach the sink in order).
fn q4_summary(path: &Path) -> std::collections::BTreeMap<u64, (u64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut summary = std::collections::BTreeMap::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("a JSON row");
        let category = row["category"].as_u64().expect("category");
        let avg = row["avg"].as_f64().expect("avg");
        let entry = summary.entry(category).or_insert((0, 0.0));
        *entry = (entry.0 + 1, avg);
    }
    summary
}

fn assert_q4_equal(got: &Path, want: &Path, what: &str) {
    let (got, want) = (q4_summary(got), q4_summary(want));
    assert_eq!(
        got.iter().map(|(c, (n, _))| (*c, *n)).collect::<Vec<_>>(),
        want.iter().map(|(c, (n, _))| (*c, *n)).collect::<Vec<_>>(),
        "{what}: q4 updates per category"
    );
    for (category, (_, avg)) in &want {
        let other = got[category].1;
        assert!(
            (other - avg).abs() <= 1e-9 * avg.abs().max(1.0),
            "{what}: q4 category {category} ends at {other}, not {avg}"
        );
    }
}

/// `part` is a sub-multiset of `whole` (both sorted).
fn is_part_of(part: &[String], whole: &[String]) -> bool {
    let mut whole = whole.iter().peekable();
    part.iter().all(|line| {
        while whole.peek().is_some_and(|w| *w < line) {
            whole.next();
        }
        whole.next() == Some(line)
    })
}

/// `dirigo run QUERY` with `source` arguments, writing to `out`.
fn run_args(query: &str, source: &[String], out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), query.into(), "--cores".into(), "2".into()];
    args.extend(source.iter().cloned());
    args.extend(["--rate".into(), RATE.into()]);
    args.push(format!("--sink=file:{}", out.display()));
    args
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Kill the checkpointed command `KILLS` times at random points, then let it
/// finish; return the kills that landed before the run ended.
fn run_with_kills(
    query: &str,
    args: &[String],
    data: &Path,
    out: &Path,
    reference: &[String],
    rng: &mut Rng,
) -> usize {
    let mut args = args.to_vec();
    args.push(format!("--data-dir={}", data.display()));
    args.push("--checkpoint-interval=100ms".into());
    let mut landed = 0;
    let mut finished = false;
    while landed < KILLS && !finished {
        let mut child = dirigo()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dirigo runs");
        // Early enough that the run has work left after five kills (each
        // run resumes from its last checkpoint, 100 ms apart at most).
        let kill_at = Duration::from_millis(30 + rng.below(500));
        let started = Instant::now();
        let mut exited = None;
        while started.elapsed() < kill_at {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match exited {
            Some(status) => {
                assert!(status.success(), "{args:?} failed: {status}");
                finished = true;
            }
            None => {
                child.kill().expect("SIGKILL"); // std's kill is SIGKILL
                child.wait().unwrap();
                landed += 1;
            }
        }
        let partial = whole_lines(out);
        if query != "q4" && !is_part_of(&partial, reference) {
            let stray: Vec<_> = partial
                .iter()
                .filter(|l| !reference.contains(l))
                .take(3)
                .collect();
            panic!(
                "{args:?}: after a kill the output holds rows of no uninterrupted run \
                 ({} lines; not in the reference: {stray:?})",
                partial.len()
            );
        }
    }
    let last = dirigo().args(&args).output().expect("dirigo runs");
    assert!(
        last.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&last.stderr)
    );
    landed
}

/// The generated events a run reads: `seed`, at the nominal `rate`.
fn events(seed: u64, rate: u64) -> Vec<dirigo_nexmark::Event> {
    let config = dirigo_nexmark::GeneratorConfig {
        seed,
        rate: dirigo_engine::dataflow::RateSchedule::constant(rate),
        ..dirigo_nexmark::GeneratorConfig::default()
    };
    let mut out = Vec::new();
    dirigo_nexmark::Generator::new(config)
        .expect("valid config")
        .fill(0..EVENTS, &mut out);
    out
}

/// The rows of `path` equal the plain reference's for `query` over `input`
/// (q4: each category's last update, its final average).
fn assert_matches_reference(query: &str, path: &Path, input: &[dirigo_nexmark::Event]) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect();
    let rows = if query == "q4" {
        let mut last = std::collections::BTreeMap::new();
        for row in rows {
            last.insert(row["category"].as_u64().expect("category"), row);
        }
        last.into_values().collect()
    } else {
        rows
    };
    let expected = reference::query(query, input);
    if let Err(e) = std::panic::catch_unwind(|| reference::assert_same_rows(&expected, &rows)) {
        let message = e.downcast_ref::<String>().cloned().unwrap_or_default();
        panic!("{query} after kills, against the plain reference: {message}");
    }
}

fn check_source(name: &str, source: Vec<String>, seed: u64, input: &[dirigo_nexmark::Event]) {
    let dir = temp_dir(name);
    let mut rng = Rng(seed);
    let mut landed = 0;
    for query in QUERIES {
        let reference_out = dir.join(format!("{query}-reference.jsonl"));
        let args = run_args(query, &source, &reference_out);
        let plain = dirigo().args(&args).output().unwrap();
        assert!(
            plain.status.success(),
            "{}",
            String::from_utf8_lossy(&plain.stderr)
        );
        let reference = sorted_lines(&reference_out);
        assert!(!reference.is_empty(), "{query} has output to compare");
        let out = dir.join(format!("{query}.jsonl"));
        let data = dir.join(format!("{query}-data"));
        let args = run_args(query, &source, &out);
        landed += run_with_kills(query, &args, &data, &out, &reference, &mut rng);
        if query == "q4" {
            assert_q4_equal(&out, &reference_out, &format!("{name} q4 after kills"));
        } else {
            assert_eq!(
                sorted_lines(&out),
                reference,
                "{name} {query}: the output after kills differs from an uninterrupted run"
            );
        }
        assert_matches_reference(query, &out, input);
    }
    eprintln!("{name}: {landed} kills, {KILLS} per query");
    assert_eq!(
        landed,
        QUERIES.len() * KILLS,
        "{name}: a run ended before its {KILLS} kills landed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_9_and_resume_with_the_paced_generator_gives_the_uninterrupted_output() {
    let source = vec![format!("--events={EVENTS}"), "--seed=7".into()];
    // Paced, the nominal rate is the pace (NEXMARK.md).
    let input = events(7, RATE.parse().unwrap());
    check_source("generator", source, 11, &input);
}

#[test]
fn kill_9_and_resume_with_the_file_source_gives_the_uninterrupted_output() {
    let dir = temp_dir("file-input");
    let input = dir.join("events.jsonl");
    let gen = dirigo()
        .args([
            "gen",
            "--events",
            &EVENTS.to_string(),
            "--seed",
            "3",
            "--out",
        ])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    // `dirigo gen` at its default nominal rate.
    check_source(
        "file",
        vec![format!("--source=file:{}", input.display())],
        29,
        &events(3, 10_000_000),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_data_directory_knows_its_run() {
    let dir = temp_dir("identity");
    let (out, data) = (dir.join("q5.jsonl"), dir.join("data"));
    let mut args = run_args("q5", &["--events=20000".into()], &out);
    args.push(format!("--data-dir={}", data.display()));
    let first = dirigo().args(&args).output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let rows = sorted_lines(&out);
    // The same command again: finished, exit 0, output untouched.
    let again = dirigo().args(&args).output().unwrap();
    assert!(again.status.success());
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(said.contains("already finished"), "{said}");
    assert_eq!(sorted_lines(&out), rows);
    // Another query on the same directory: refused, naming the difference.
    let mut other = run_args("q7", &["--events=20000".into()], &out);
    other.push(format!("--data-dir={}", data.display()));
    let refused = dirigo().args(&other).output().unwrap();
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        error.contains("query") && error.contains("q5") && error.contains("q7"),
        "{error}"
    );
    assert!(error.contains("--fresh"), "{error}");
    // --fresh discards it and runs the new query.
    other.push("--fresh".into());
    let fresh = dirigo().args(&other).output().unwrap();
    assert!(
        fresh.status.success(),
        "{}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    assert!(!sorted_lines(&out).is_empty());
    // stdout cannot be taken back: refused with a data directory.
    let stdout_sink = dirigo()
        .args(["run", "q0", "--events=10", "--sink=stdout"])
        .arg(format!("--data-dir={}", dir.join("other").display()))
        .output()
        .unwrap();
    assert!(!stdout_sink.status.success());
    assert!(String::from_utf8_lossy(&stdout_sink.stderr).contains("stdout"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relative `--data-dir` is the current directory's: its checkpoints
/// commit (they once all failed, glommio refusing a relative directory).
#[test]
fn a_relative_data_directory_takes_checkpoints() {
    let dir = temp_dir("relative");
    let run = dirigo()
        .current_dir(&dir)
        .args(["run", "q5", "--cores=1", "--events=300000", "--rate=300000"])
        .args(["--data-dir=data", "--checkpoint-interval=100ms", "--json"])
        .args(["--sink=file:out.jsonl"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a summary")).expect("JSON");
    let checkpoints = &summary["checkpoints"];
    assert_eq!(checkpoints["failed"], 0, "{checkpoints}");
    assert!(
        checkpoints["completed"].as_u64().unwrap() >= 3,
        "{checkpoints}"
    );
    assert!(dir.join("data/checkpoints").is_dir());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run fenced as one placement of a cluster's job commits no checkpoint
/// once a later placement has claimed its data directory, and fails saying
/// so; a run of the old placement is refused at start; the later one
/// resumes and ends with an uninterrupted run's rows.
#[test]
fn a_fenced_run_commits_nothing_once_a_later_placement_claims_it() {
    let dir = temp_dir("fence");
    let (out, data) = (dir.join("q5.jsonl"), dir.join("data"));
    let reference_out = dir.join("reference.jsonl");
    let source = ["--events=600000".to_string(), "--seed=5".into()];
    let plain = dirigo()
        .args(run_args("q5", &source, &reference_out))
        .output()
        .unwrap();
    assert!(plain.status.success());
    let mut args = run_args("q5", &source, &out);
    args.push(format!("--data-dir={}", data.display()));
    args.push("--checkpoint-interval=100ms".into());
    let placement = |epoch: u64| {
        let mut with = args.clone();
        with.push(format!("--fence-epoch={epoch}"));
        with
    };
    let first = dirigo()
        .args(placement(1))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it commit a few checkpoints, then claim the directory for
    // placement 2 (as a new run would) behind its back.
    let start = Instant::now();
    while checkpoint_epochs(&data).len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "no checkpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(data.join("fence"), "2").unwrap();
    let claimed = checkpoint_epochs(&data).last().copied().unwrap();
    let first = first.wait_with_output().unwrap();
    assert!(!first.status.success(), "the fenced run failed");
    let error = String::from_utf8_lossy(&first.stderr);
    assert!(error.contains("fenced: placement 2"), "{error}");
    // At most the commit already under way when the fence moved.
    let after = checkpoint_epochs(&data).last().copied().unwrap();
    assert!(
        after <= claimed + 1,
        "committed {claimed}..{after} after the fence"
    );
    // The old placement again: refused before it runs.
    let stale = dirigo().args(placement(1)).output().unwrap();
    assert!(!stale.status.success());
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("placement 2 has taken"),
        "{}",
        String::from_utf8_lossy(&stale.stderr)
    );
    // The new placement resumes and ends exact.
    let second = dirigo().args(placement(2)).output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(sorted_lines(&out), sorted_lines(&reference_out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The epochs of the committed checkpoints in `data`.
fn checkpoint_epochs(data: &Path) -> Vec<u64> {
    if !data.join("checkpoints").is_dir() {
        return Vec::new();
    }
    dirigo_engine::dataflow::checkpoint::manifest_epochs(data).unwrap_or_default()
}

/// Wait for `child` at most `limit`; killed and reported if it takes longer.
fn wait_within(child: std::process::Child, limit: Duration, what: &str) -> std::process::Output {
    let id = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let watchdog = std::thread::spawn(move || {
        let started = Instant::now();
        while !flag.load(std::sync::atomic::Ordering::Acquire) {
            if started.elapsed() > limit {
                // SIGKILL; the wait below then returns and the caller fails.
                let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    let output = child.wait_with_output().expect("the command ends");
    done.store(true, std::sync::atomic::Ordering::Release);
    assert!(
        !watchdog.join().unwrap(),
        "{what} did not end within {limit:?}"
    );
    output
}

/// One job over two `dirigo run --nodes` processes (one shard each) that
/// share a data directory: node 0 commits the checkpoints, node 1's actors
/// write their state there and hand their parts to node 0. Both processes
/// are killed with SIGKILL (twice, each time at a random point up to 300 ms
/// after the pair committed 1 to 6 checkpoints) and run again, the last
/// time as one process of two shards, until it ends: after each kill the
/// output (node 0's `--sink`, the only
/// sink partition) holds only rows of the reference, each at most as often
/// as there; the last run resumed from a checkpoint (its report says
/// which); and at the end the output holds exactly the reference's rows.
/// For q5 and q8, over the paced generator.
#[test]
fn kill_9_of_both_nodes_and_resume_over_two_processes_then_one_gives_the_reference_rows() {
    let dir = temp_dir("nodes");
    let secret = dir.join("secret");
    std::fs::write(&secret, "two nodes of one checkpointed run\n").unwrap();
    let input = events(5, RATE.parse().unwrap());
    let mut rng = Rng(41);
    for query in ["q5", "q8"] {
        let out = dir.join(format!("{query}.jsonl"));
        let data = dir.join(format!("{query}-data"));
        let expected: Vec<String> = reference::query(query, &input)
            .iter()
            .map(|row| row.to_string())
            .collect();
        let args = |ports: &[u16], node: usize| -> Vec<String> {
            let sink = match node {
                0 => out.clone(),
                _ => dir.join(format!("{query}-node{node}.jsonl")),
            };
            vec![
                "run".into(),
                query.into(),
                format!("--events={EVENTS}"),
                "--seed=5".into(),
                format!("--rate={RATE}"),
                "--cores=1".into(),
                format!("--sink=file:{}", sink.display()),
                format!("--data-dir={}", data.display()),
                "--checkpoint-interval=100ms".into(),
                format!("--nodes=127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]),
                format!("--node={node}"),
                format!("--secret-file={}", secret.display()),
                "--json".into(),
            ]
        };
        let mut kills = 0;
        let resumed_from = loop {
            let ports: Vec<u16> = (0..2)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
                .collect::<Vec<_>>()
                .iter()
                .map(|l| l.local_addr().unwrap().port())
                .collect();
            // After the kills, the run resumes in one process of two
            // shards: as many shards as the two nodes had.
            let nodes: &[usize] = if kills < 2 { &[1, 0] } else { &[0] };
            let mut children: Vec<std::process::Child> = nodes
                .iter()
                .map(|&node| {
                    let mut args = args(&ports, node);
                    if kills == 2 {
                        args.retain(|a| {
                            !["--nodes", "--node=", "--secret", "--cores"]
                                .iter()
                                .any(|f| a.starts_with(f))
                        });
                        args.push("--cores=2".into());
                    }
                    dirigo()
                        .args(args)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("dirigo runs")
                })
                .collect();
            if kills < 2 {
                // Into the run: once this pair committed 1 to 6
                // checkpoints, a moment later.
                let due = checkpoint_epochs(&data).last().copied().unwrap_or(0) + 1 + rng.below(6);
                let started = Instant::now();
                while checkpoint_epochs(&data).last().copied().unwrap_or(0) < due
                    && started.elapsed() < Duration::from_secs(30)
                    && children.iter_mut().all(|c| c.try_wait().unwrap().is_none())
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                std::thread::sleep(Duration::from_millis(rng.below(300)));
                if children.iter_mut().all(|c| c.try_wait().unwrap().is_none()) {
                    for child in &mut children {
                        child.kill().expect("SIGKILL");
                        child.wait().unwrap();
                    }
                    kills += 1;
                    // Committed rows only: a sub-multiset of the reference's
                    // (rows compared as JSON values printed alike; q5's and
                    // q8's rows hold no floats).
                    let mut left = expected.clone();
                    let whole = whole_lines(&out);
                    for line in &whole {
                        let row: serde_json::Value =
                            serde_json::from_str(line).expect("a JSON row");
                        let text = row.to_string();
                        let at = left.iter().position(|r| *r == text).unwrap_or_else(|| {
                            panic!("{query} after kill {kills}: {line} is no reference row, or one too many")
                        });
                        left.swap_remove(at);
                    }
                    eprintln!(
                        "{query}: kill {kills}: {} committed rows, checkpoints {:?}",
                        whole.len(),
                        checkpoint_epochs(&data)
                    );
                    continue;
                }
            }
            let mut reports = Vec::new();
            for (child, node) in children.into_iter().zip(nodes) {
                let output = wait_within(
                    child,
                    Duration::from_secs(120),
                    &format!("{query} node {node}"),
                );
                assert!(
                    output.status.success(),
                    "{query} node {node}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                let stdout = String::from_utf8_lossy(&output.stdout).to_string();
                let report: serde_json::Value =
                    serde_json::from_str(stdout.lines().last().expect("a summary")).expect("JSON");
                reports.push(report);
            }
            // The one process's report: the checkpoint it resumed from.
            assert_eq!(reports.len(), 1);
            assert_eq!(reports[0]["cores"].as_u64(), Some(2), "{}", reports[0]);
            break reports[0]["checkpoints"]["resumed_from"].as_u64();
        };
        assert_eq!(kills, 2, "{query}: the run ended before both kills");
        assert!(
            resumed_from.is_some_and(|epoch| epoch > 0),
            "{query}: the last run did not resume from a checkpoint"
        );
        assert_matches_reference(query, &out, &input);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! The cluster, as users run it: `dirigo node` processes on loopback, jobs
//! given with `dirigo submit`, watched with `dirigo status --json`.
//!
//! - Node loss: three nodes run q5 and q8 over a file; the node running q5
//!   is killed with SIGKILL mid-run; both jobs finish, and their output is
//!   exactly an uninterrupted run's, which is the plain reference's.
//! - Partition: the node running a job is cut off from the others (the
//!   node's message-dropping test hook); the majority places the job
//!   elsewhere and finishes it exactly, and the activation logs of all
//!   nodes show no two runs of the job alive at once.
//! - Authentication: a node or client with the wrong secret, or of another
//!   cluster, is refused, and `status` never lists it.
//! - Cancel, and submissions the cluster refuses.

mod reference;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SECRET: &str = "a cluster secret of some length";

/// One cluster at a time: each runs three node processes and their jobs'
/// runs, and the leases' margins are for a machine that is not starved.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn dirigo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dirigo"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dirigo-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Ports for the nodes' runs over nodes (`--run-ports`): 16 in a row that
/// are free now, picked once per test process.
fn run_ports() -> &'static str {
    static PORTS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PORTS.get_or_init(|| {
        let mut base = 20_000 + (std::process::id() % 600) as u16 * 16;
        loop {
            let free = (base..base + 16)
                .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
            if free {
                return format!("{base}-{}", base + 15);
            }
            base = if base >= 29_000 { 20_000 } else { base + 16 };
        }
    })
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A node process, killed when dropped.
struct NodeProcess {
    addr: String,
    child: Child,
    log: PathBuf,
    isolate: PathBuf,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    fn start(dir: &Path, name: &str, secret: &Path, join: Option<&str>) -> NodeProcess {
        Self::start_at(dir, name, secret, join, &free_addr())
    }

    fn start_at(
        dir: &Path,
        name: &str,
        secret: &Path,
        join: Option<&str>,
        addr: &str,
    ) -> NodeProcess {
        Self::start_with(dir, name, secret, join, addr, &[])
    }

    /// Start a node with `extra` flags too.
    fn start_with(
        dir: &Path,
        name: &str,
        secret: &Path,
        join: Option<&str>,
        addr: &str,
        extra: &[&str],
    ) -> NodeProcess {
        let addr = addr.to_string();
        let log = dir.join(format!("{name}-{}.log", log_serial()));
        let isolate = dir.join(format!("{name}.isolated"));
        let mut command = dirigo();
        command
            .args(["node", "--listen", &addr])
            .arg("--data-dir")
            .arg(dir.join(name))
            .arg("--secret-file")
            .arg(secret)
            .arg("--isolate-file")
            .arg(&isolate)
            .args(["--run-ports", run_ports()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(join) = join {
            command.args(["--join", join]);
        }
        command.args(extra);
        let child = command.spawn().expect("dirigo node starts");
        NodeProcess {
            addr,
            child,
            log,
            isolate,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, once it exited by itself within `within`.
    fn exited_within(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "{what} still runs: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// This node's id, as its first log line says (waiting for the line
    /// to be whole).
    fn id(&self) -> u64 {
        let start = Instant::now();
        loop {
            let log = self.log();
            if let Some((line, _)) = log.split_once('\n') {
                return line
                    .strip_prefix("dirigo node ")
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|id| id.parse().ok())
                    .unwrap_or_else(|| panic!("no node id in {line:?}"));
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} logged no start",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A new number for each node process's log file.
fn log_serial() -> u64 {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn write_secret(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path
}

/// `dirigo status --json` from the node at `addr`; None if it failed.
fn status(addr: &str, secret: &Path) -> Option<Value> {
    let out = dirigo()
        .args(["status", "--json", "--to", addr])
        .arg("--secret-file")
        .arg(secret)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last()?).ok()
}

/// Poll `status` on any of `addrs` until `done` holds, or panic after
/// `limit`.
fn wait_for(
    addrs: &[&str],
    secret: &Path,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < limit {
        for addr in addrs {
            if let Some(status) = status(addr, secret) {
                if done(&status) {
                    return status;
                }
                last = Some(status);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}; last status {last:?}");
}

fn alive_nodes(status: &Value) -> usize {
    status["nodes"]
        .as_array()
        .map_or(0, |n| n.iter().filter(|n| n["alive"] == true).count())
}

fn job<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Start a cluster of `n` nodes; wait until all are alive members.
fn cluster(dir: &Path, secret: &Path, n: usize) -> Vec<NodeProcess> {
    cluster_with(dir, secret, n, &[])
}

/// `cluster`, every node started with `extra` flags too.
fn cluster_with(dir: &Path, secret: &Path, n: usize, extra: &[&str]) -> Vec<NodeProcess> {
    let first = NodeProcess::start_with(dir, "n1", secret, None, &free_addr(), extra);
    let seed = first.addr.clone();
    let mut nodes = vec![first];
    // The first node's listener must be up before others ask to join.
    wait_for(
        &[&seed],
        secret,
        Duration::from_secs(20),
        "the first node",
        |s| alive_nodes(s) == 1,
    );
    for i in 2..=n {
        nodes.push(NodeProcess::start_with(
            dir,
            &format!("n{i}"),
            secret,
            Some(&seed),
            &free_addr(),
            extra,
        ));
    }
    wait_for(
        &[&seed],
        secret,
        Duration::from_secs(30),
        "every node joined",
        |s| {
            let voters = s["nodes"]
                .as_array()
                .map_or(0, |n| n.iter().filter(|n| n["voter"] == true).count());
            alive_nodes(s) == n && voters == n && s["leader"].as_u64().unwrap_or(0) != 0
        },
    );
    nodes
}

/// `dirigo COMMAND --to ADDR --secret-file SECRET ARGS`, run in `cwd`.
fn client(
    command: &str,
    addr: &str,
    secret: &Path,
    cwd: &Path,
    args: &[&str],
) -> std::process::Output {
    dirigo()
        .current_dir(cwd)
        .args([command, "--to", addr])
        .arg("--secret-file")
        .arg(secret)
        .args(args)
        .output()
        .unwrap()
}

fn submit(addr: &str, secret: &Path, cwd: &Path, query: &str, flags: &[&str]) -> String {
    let mut args = vec![query];
    args.extend(flags);
    let out = client("submit", addr, secret, cwd, &args);
    assert!(
        out.status.success(),
        "submit {query} {flags:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Submit `count` one-event q0 jobs to the node at `addr`, each with a data
/// directory `2 * depth` bytes deep (long commands, a large state), and
/// wait until all finished; their names.
fn long_named_jobs(
    addr: &str,
    secret: &Path,
    dir: &Path,
    count: usize,
    depth: usize,
) -> Vec<String> {
    let names: Vec<String> = (0..count)
        .map(|i| {
            let deep = format!("--data-dir=d{i}/{}", "x/".repeat(depth));
            submit(addr, secret, dir, "q0", &[&deep, "--events=1", "--cores=1"])
        })
        .collect();
    wait_for(
        &[addr],
        secret,
        Duration::from_secs(120),
        "all finished",
        |s| names.iter().all(|n| job(s, n)["state"] == "finished"),
    );
    names
}

/// A cluster job's flags: `query` over the events file at `rate`, rows to
/// `QUERY.jsonl` and checkpoints (every 100 ms) to `QUERY-data`, both in
/// the directory the job is submitted from.
fn file_job(events: &Path, query: &str, rate: u64) -> Vec<String> {
    vec![
        format!("--source=file:{}", events.display()),
        format!("--sink=file:{query}.jsonl"),
        format!("--data-dir={query}-data"),
        "--cores=1".into(),
        format!("--rate={rate}"),
        "--checkpoint-interval=100ms".into(),
    ]
}

/// A cluster job's flags with two shards: it runs over two nodes.
fn over_two(mut flags: Vec<String>) -> Vec<String> {
    flags.retain(|f| !f.starts_with("--cores"));
    flags.push("--cores=2".into());
    flags
}

/// Submit q5 of two shards over the events file at `rate` to the first of
/// `addrs`; wait until it is placed over two nodes: its name, and the
/// status that shows it.
fn submit_over_two(
    addrs: &[&str],
    secret: &Path,
    dir: &Path,
    events: &Path,
    rate: u64,
) -> (String, Value) {
    let flags = over_two(file_job(events, "q5", rate));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let name = submit(addrs[0], secret, dir, "q5", &flags);
    let placed = wait_for(addrs, secret, Duration::from_secs(20), "q5 placed", |s| {
        placement(s, &name).len() == 2
    });
    (name, placed)
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// Events in a file, and each query's rows from an uninterrupted run.
fn input(dir: &Path, events: u64, seed: u64) -> (PathBuf, Vec<dirigo_nexmark::Event>) {
    let path = dir.join("events.jsonl");
    let gen = dirigo()
        .args([
            "gen",
            "--events",
            &events.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .arg("--out")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let config = dirigo_nexmark::GeneratorConfig {
        seed,
        rate: dirigo_engine::dataflow::RateSchedule::constant(10_000_000),
        ..dirigo_nexmark::GeneratorConfig::default()
    };
    let mut out = Vec::new();
    dirigo_nexmark::Generator::new(config)
        .expect("valid config")
        .fill(0..events, &mut out);
    (path, out)
}

/// `query`'s rows from one plain run of `dirigo run` over `input`.
fn uninterrupted(dir: &Path, query: &str, input: &Path) -> Vec<String> {
    let out = dir.join(format!("{query}-uninterrupted.jsonl"));
    let run = dirigo()
        .args(["run", query, "--cores=1"])
        .arg(format!("--source=file:{}", input.display()))
        .arg(format!("--sink=file:{}", out.display()))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    sorted_lines(&out)
}

fn assert_exact(query: &str, out: &Path, plain: &[String], events: &[dirigo_nexmark::Event]) {
    let got = sorted_lines(out);
    assert!(!got.is_empty(), "{query} wrote rows");
    assert_eq!(
        got, plain,
        "{query}: the cluster's rows differ from an uninterrupted run"
    );
    let rows: Vec<Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    reference::assert_same_rows(&reference::query(query, events), &rows);
}

/// One activation of a job on a node, from the node's log.
#[derive(Debug)]
struct Activation {
    node: usize,
    epoch: u64,
    started: u64,
    /// None: it still ran when the log was read.
    stopped: Option<u64>,
}

/// Every activation of `job` in the nodes' logs ("activation JOB epoch E
/// pid P started at T", then "stopped at T" or "ended at T").
fn activations(nodes: &[NodeProcess], job: &str) -> Vec<Activation> {
    let mut found = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut open: BTreeMap<u64, Activation> = BTreeMap::new();
        for line in node.log().lines() {
            let Some(rest) = line.split(&format!(": activation {job} epoch ")).nth(1) else {
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            let epoch: u64 = words[0].parse().unwrap();
            let at: u64 = words[words.iter().position(|w| *w == "at").unwrap() + 1]
                .trim_end_matches([':', ','])
                .parse()
                .unwrap();
            if words.contains(&"started") {
                open.insert(
                    epoch,
                    Activation {
                        node: n,
                        epoch,
                        started: at,
                        stopped: None,
                    },
                );
            } else if let Some(mut a) = open.remove(&epoch) {
                a.stopped = Some(at);
                found.push(a);
            }
        }
        found.extend(open.into_values());
    }
    found
}

/// Activations of different placements of a job never overlap in time, nor
/// do two on one node (the parts of one placement run together, on their
/// nodes; a job on one node whose node lost its lease for a moment runs
/// again in the same placement).
fn assert_placements_never_overlap(activations: &[Activation], job: &str) {
    for (i, a) in activations.iter().enumerate() {
        for b in &activations[i + 1..] {
            if a.epoch == b.epoch && a.node != b.node {
                continue;
            }
            let a_end = a.stopped.unwrap_or(u64::MAX);
            let b_end = b.stopped.unwrap_or(u64::MAX);
            assert!(
                a_end <= b.started || b_end <= a.started,
                "{job} ran twice at once: {a:?} and {b:?}"
            );
        }
    }
}

/// No node started its part of a placement of a job over several nodes
/// twice (its peers would have run on without the first).
fn assert_each_part_started_once(activations: &[Activation], job: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for a in activations {
        assert!(
            seen.insert((a.node, a.epoch)),
            "{job}: node {} started its part of placement {} twice: {activations:?}",
            a.node,
            a.epoch
        );
    }
}

/// The monotonic clock the nodes' activation logs use.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether `pid` runs (a zombie, dead but not reaped, does not).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// A test's directory and secret, an events file, its events, and q5's
/// rows over them run uninterrupted outside any cluster.
struct Q5Input {
    dir: PathBuf,
    secret: PathBuf,
    events_path: PathBuf,
    events: Vec<dirigo_nexmark::Event>,
    plain: Vec<String>,
}

fn q5_input(name: &str, events: u64, seed: u64) -> Q5Input {
    let dir = temp_dir(name);
    let secret = write_secret(&dir, "secret", SECRET);
    let (events_path, events) = input(&dir, events, seed);
    let plain = uninterrupted(&dir, "q5", &events_path);
    Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    }
}

/// A cluster of three running q5 and q8 over a file of a million events.
struct QueriesOnThree {
    dir: PathBuf,
    secret: PathBuf,
    events: Vec<dirigo_nexmark::Event>,
    /// Each query's rows run uninterrupted, outside the cluster.
    plain: BTreeMap<&'static str, Vec<String>>,
    nodes: Vec<NodeProcess>,
    /// Each query's job.
    names: BTreeMap<&'static str, String>,
}

/// Start three nodes and submit q5 and q8 (their flags through `shape`) at
/// 200,000 events/s, each to another node: any node takes a job.
fn q5_and_q8_on_three_nodes(
    name: &str,
    seed: u64,
    shape: impl Fn(Vec<String>) -> Vec<String>,
) -> QueriesOnThree {
    let dir = temp_dir(name);
    let secret = write_secret(&dir, "secret", SECRET);
    let (events_path, events) = input(&dir, 1_000_000, seed);
    let plain: BTreeMap<&str, Vec<String>> = ["q5", "q8"]
        .into_iter()
        .map(|q| (q, uninterrupted(&dir, q, &events_path)))
        .collect();
    let nodes = cluster(&dir, &secret, 3);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let mut names = BTreeMap::new();
    for (i, query) in ["q5", "q8"].into_iter().enumerate() {
        let flags = shape(file_job(&events_path, query, 200_000));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        names.insert(query, submit(addrs[i + 1], &secret, &dir, query, &flags));
    }
    QueriesOnThree {
        dir,
        secret,
        events,
        plain,
        nodes,
        names,
    }
}

#[test]
fn a_node_killed_mid_run_loses_nothing_and_repeats_nothing() {
    let _one = one_at_a_time();
    let QueriesOnThree {
        dir,
        secret,
        events,
        plain,
        nodes,
        names,
    } = q5_and_q8_on_three_nodes("node-loss", 5, |flags| flags);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let q5 = names["q5"].clone();
    let placed = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "both placed",
        |s| names.values().all(|n| job(s, n)["node"].as_u64().is_some()),
    );
    let owner_id = job(&placed, &q5)["node"].as_u64().unwrap();
    let owner = nodes.iter().position(|n| n.id() == owner_id).unwrap();
    // Let the runs take checkpoints, then kill q5's node.
    std::thread::sleep(Duration::from_millis(1500));
    let run_pid: i32 = {
        let log = nodes[owner].log();
        let line = log
            .lines()
            .find(|l| l.contains(&format!("activation {q5} epoch 1 pid")))
            .expect("the owner started q5");
        line.split(" pid ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut nodes = nodes;
    let killed_at = Instant::now();
    let mut victim = nodes.remove(owner);
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let moved = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "q5 placed again",
        |s| job(s, &q5)["epoch"].as_u64() == Some(2),
    );
    let failover = killed_at.elapsed();
    assert_ne!(job(&moved, &q5)["node"].as_u64(), Some(owner_id));
    // The run died with its node.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !process_alive(run_pid),
        "q5's run (pid {run_pid}) outlived its node"
    );
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(120),
        "both finished",
        |s| names.values().all(|n| job(s, n)["state"] == "finished"),
    );
    let lost: Vec<&Value> = done["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == false)
        .collect();
    assert_eq!(lost.len(), 1, "{done}");
    assert_eq!(lost[0]["id"].as_u64(), Some(owner_id));
    // It resumed from a checkpoint the killed node's run committed.
    let resumed = &job(&done, &q5)["checkpoints"]["resumed_from"];
    assert!(
        resumed.as_u64().is_some(),
        "q5 resumed from a checkpoint: {done}"
    );
    for query in ["q5", "q8"] {
        assert_exact(
            query,
            &dir.join(format!("{query}.jsonl")),
            &plain[query],
            &events,
        );
    }
    eprintln!(
        "node loss: q5 placed again {} ms after the kill; resumed from checkpoint {resumed}",
        failover.as_millis()
    );
    // The killed node, started again on its data directory and address,
    // takes its place: alive, and its jobs left where they finished.
    let name = format!("n{}", owner + 1);
    let restarted = NodeProcess::start_at(&dir, &name, &secret, None, &victim.addr);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let back = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "the node back",
        |s| alive_nodes(s) == 3,
    );
    assert_eq!(restarted.id(), owner_id);
    assert_eq!(job(&back, &q5)["state"], "finished");
    // Given time to catch up (and to run anything it wrongly thought its
    // own), it ran nothing.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !restarted.log().contains("activation"),
        "{}",
        restarted.log()
    );
    drop(restarted);
    drop(nodes);
    drop(victim);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid of the run of `job`'s placement `epoch` that `node` started.
fn run_pid(node: &NodeProcess, job: &str, epoch: u64) -> i32 {
    let log = node.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("activation {job} epoch {epoch} pid")))
        .unwrap_or_else(|| panic!("no run of {job} epoch {epoch}: {log}"));
    line.split(" pid ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A job's nodes in a status: part 0 first.
fn placement(status: &Value, name: &str) -> Vec<u64> {
    let job = job(status, name);
    job["node"]
        .as_u64()
        .into_iter()
        .chain(
            job["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p.as_u64().unwrap()),
        )
        .collect()
}

/// Jobs of two shards on a cluster of three run over two nodes each; a
/// node that runs a part of both is killed: both move to the two nodes
/// left, resume from their checkpoints and write exactly the reference's
/// rows, and no two placements of a job ever run at once.
#[test]
fn jobs_run_over_several_nodes_and_survive_the_loss_of_one() {
    let _one = one_at_a_time();
    let QueriesOnThree {
        dir,
        secret,
        events,
        plain,
        nodes,
        names,
    } = q5_and_q8_on_three_nodes("spread", 7, over_two);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let placed = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "both placed over two nodes",
        |s| names.values().all(|n| placement(s, n).len() == 2),
    );
    // Four parts over three nodes: one node runs a part of both.
    let both: Vec<u64> = placement(&placed, &names["q5"])
        .into_iter()
        .filter(|n| placement(&placed, &names["q8"]).contains(n))
        .collect();
    assert_eq!(both.len(), 1, "{placed}");
    // The human status names both nodes of each, part 0's first.
    let human = client("status", addrs[0], &secret, &dir, &[]);
    let human = String::from_utf8_lossy(&human.stdout);
    for name in names.values() {
        let nodes = placement(&placed, name);
        let line = format!("nodes {}, {} epoch 1", nodes[0], nodes[1]);
        assert!(human.contains(&line), "{line:?} in {human}");
    }
    let victim_id = both[0];
    let victim = nodes.iter().position(|n| n.id() == victim_id).unwrap();
    // Both runs take checkpoints before the kill.
    std::thread::sleep(Duration::from_millis(1500));
    let pids: Vec<i32> = names
        .values()
        .map(|name| run_pid(&nodes[victim], name, 1))
        .collect();
    let mut nodes = nodes;
    let killed_at = Instant::now();
    let mut killed = nodes.remove(victim);
    killed.child.kill().unwrap(); // SIGKILL
    killed.child.wait().unwrap();
    // Its runs die with it (at once: they are killed by the kernel).
    while pids.iter().any(|pid| process_alive(*pid)) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(2),
            "a run of {pids:?} outlived its node"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let runs_dead = monotonic_ns();
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let moved = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "both placed again, off the killed node",
        // (A part that lost its peer may run its placement again first,
        // the killed node still in it; the leader then moves it off.)
        |s| {
            names.values().all(|n| {
                job(s, n)["epoch"].as_u64() >= Some(2) && !placement(s, n).contains(&victim_id)
            })
        },
    );
    let failover = killed_at.elapsed();
    for name in names.values() {
        let now = placement(&moved, name);
        assert_eq!(now.len(), 2, "{name} runs over the two nodes left: {moved}");
        assert!(!now.contains(&victim_id), "{moved}");
    }
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(180),
        "both finished",
        |s| names.values().all(|n| job(s, n)["state"] == "finished"),
    );
    for (query, name) in &names {
        let report = job(&done, name);
        // A run over the two nodes, resumed: part 0's figures, and part
        // 1's added once its summary is in the log (`parts_reported`).
        assert_eq!(report["nodes"].as_u64(), Some(2), "{done}");
        let parts = report["parts_reported"].as_u64().unwrap_or(1);
        assert_eq!(report["cores"].as_u64(), Some(parts), "{done}");
        assert!(
            report["checkpoints"]["resumed_from"].as_u64().is_some(),
            "{query} resumed from a checkpoint: {done}"
        );
        assert_exact(
            query,
            &dir.join(format!("{query}.jsonl")),
            &plain[query],
            &events,
        );
        let mut all = activations(&nodes, name);
        // The killed node's runs ended by the time they were seen dead.
        all.extend(
            activations(std::slice::from_ref(&killed), name)
                .into_iter()
                .map(|mut a| {
                    a.node = usize::MAX;
                    a.stopped = Some(a.stopped.unwrap_or(runs_dead));
                    a
                }),
        );
        assert!(all.iter().any(|a| a.epoch == 1 && a.node == usize::MAX));
        assert_placements_never_overlap(&all, name);
        assert_each_part_started_once(&all, name);
    }
    eprintln!(
        "spread: both placed again {} ms after the kill; {:?}",
        failover.as_millis(),
        names
            .values()
            .map(|n| job(&done, n)["checkpoints"]["resumed_from"].clone())
            .collect::<Vec<_>>()
    );
    drop(nodes);
    drop(killed);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A part of a job over two nodes stops answering while both nodes live
/// (its run is stopped with SIGSTOP): part 0's run gives up on it and
/// exits as having lost a peer; its node runs the job again on the same
/// placement, whose other node stops the frozen part first, and the job
/// resumes and ends exact.
#[test]
fn a_part_that_lost_its_peer_is_run_again_on_the_same_nodes() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("peer-lost", 1_000_000, 11);
    let nodes = cluster(&dir, &secret, 2);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    // Two shards: the job runs over two nodes.
    let (name, placed) = submit_over_two(&addrs, &secret, &dir, &events_path, 200_000);
    let first = placement(&placed, &name);
    let part1 = nodes.iter().position(|n| n.id() == first[1]).unwrap();
    let part0 = nodes.iter().position(|n| n.id() == first[0]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let frozen = run_pid(&nodes[part1], &name, 1);
    // SAFETY: a signal to a child's child this test started.
    assert_eq!(unsafe { libc::kill(frozen, libc::SIGSTOP) }, 0);
    let again = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(30),
        "q5 run again",
        |s| job(s, &name)["epoch"].as_u64() >= Some(2),
    );
    assert_eq!(placement(&again, &name), first, "the same nodes: {again}");
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(120),
        "q5 finished",
        |s| job(s, &name)["state"] == "finished",
    );
    assert!(
        job(&done, &name)["checkpoints"]["resumed_from"]
            .as_u64()
            .is_some(),
        "{done}"
    );
    assert!(!process_alive(frozen), "the frozen part was stopped");
    assert!(
        nodes[part0]
            .log()
            .contains(&format!("{name} lost a peer (dirigo: node ")),
        "{}",
        nodes[part0].log()
    );
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    let all = activations(&nodes, &name);
    assert_placements_never_overlap(&all, &name);
    assert_each_part_started_once(&all, &name);
    eprintln!("peer lost: activations {all:?}");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node running a part of a job over two nodes is killed and at once
/// started again on its data directory: it does not start its part of the
/// placement it had started (the other part ran on without it); the job
/// runs again whole and ends exact.
#[test]
fn a_node_restarted_mid_run_does_not_start_its_part_twice() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("node-restart", 1_000_000, 13);
    let mut nodes = cluster(&dir, &secret, 3);
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let (name, placed) = submit_over_two(&addr_refs, &secret, &dir, &events_path, 200_000);
    // The part other than part 0 (its node writes no output).
    let part1 = placement(&placed, &name)[1];
    let restarted = nodes.iter().position(|n| n.id() == part1).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let old = {
        let node = &mut nodes[restarted];
        node.child.kill().unwrap(); // SIGKILL
        node.child.wait().unwrap();
        NodeProcess::start_at(
            &dir,
            &format!("n{}", restarted + 1),
            &secret,
            None,
            &addrs[restarted],
        )
    };
    let old = std::mem::replace(&mut nodes[restarted], old);
    let done = wait_for(
        &addr_refs,
        &secret,
        Duration::from_secs(120),
        "q5 finished",
        |s| job(s, &name)["state"] == "finished",
    );
    assert!(job(&done, &name)["epoch"].as_u64() >= Some(2), "{done}");
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    // The node's two processes' logs, as one node's.
    let mut all = activations(&nodes, &name);
    all.extend(
        activations(std::slice::from_ref(&old), &name)
            .into_iter()
            .map(|mut a| {
                a.node = restarted;
                // Its run died with it, by the time it was started again.
                a.stopped = a.stopped.or(Some(0));
                a
            }),
    );
    assert_each_part_started_once(&all, &name);
    eprintln!("node restart: activations {all:?}");
    drop(nodes);
    drop(old);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first run port is held by another process: the part placed on it
/// cannot listen, exits saying so, and its node runs the job again on
/// other ports; it ends exact.
#[test]
fn a_run_port_another_process_holds_is_left_for_another() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("port-taken", 300_000, 19);
    let nodes = cluster(&dir, &secret, 2);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    // A fresh leader gives the range's first ports first.
    let first: u16 = run_ports().split('-').next().unwrap().parse().unwrap();
    let _holder = std::net::TcpListener::bind(("127.0.0.1", first)).unwrap();
    let (name, placed) = submit_over_two(&addrs, &secret, &dir, &events_path, 200_000);
    let ports = |s: &Value| -> Vec<u64> {
        job(s, &name)["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect()
    };
    assert!(ports(&placed).contains(&u64::from(first)), "{placed}");
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(120),
        "q5 finished",
        |s| job(s, &name)["state"] == "finished",
    );
    assert!(!ports(&done).contains(&u64::from(first)), "{done}");
    assert_eq!(placement(&done, &name), placement(&placed, &name));
    let logs: String = nodes.iter().map(NodeProcess::log).collect();
    assert!(
        logs.contains(&format!(
            "{name} could not listen (dirigo: listening on 127.0.0.1:{first}"
        )),
        "{logs}"
    );
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// q5 of two shards on a cluster of one runs there; a second node joins:
/// the leader widens q5 over both (its run stopped, then both parts
/// started, resumed from the checkpoint), and it ends exact.
#[test]
fn a_job_widens_over_a_node_that_joins() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("widen", 1_000_000, 23);
    let mut nodes = cluster(&dir, &secret, 1);
    let first = nodes[0].addr.clone();
    let flags = over_two(file_job(&events_path, "q5", 200_000));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let name = submit(&first, &secret, &dir, "q5", &flags);
    let placed = wait_for(
        &[&first],
        &secret,
        Duration::from_secs(20),
        "q5 placed",
        |s| job(s, &name)["epoch"] == 1,
    );
    // Two shards on the one node.
    assert_eq!(placement(&placed, &name), vec![nodes[0].id()]);
    std::thread::sleep(Duration::from_millis(1200));
    nodes.push(NodeProcess::start(&dir, "n2", &secret, Some(&first)));
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let wide = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(30),
        "q5 over both nodes",
        |s| placement(s, &name).len() == 2,
    );
    let mut both = placement(&wide, &name);
    both.sort_unstable();
    let mut ids: Vec<u64> = nodes.iter().map(NodeProcess::id).collect();
    ids.sort_unstable();
    assert_eq!(both, ids);
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(120),
        "q5 finished",
        |s| job(s, &name)["state"] == "finished",
    );
    assert_eq!(job(&done, &name)["nodes"].as_u64(), Some(2), "{done}");
    assert!(
        job(&done, &name)["checkpoints"]["resumed_from"]
            .as_u64()
            .is_some(),
        "{done}"
    );
    // The leader's widening, logged.
    let logs: String = nodes.iter().map(NodeProcess::log).collect();
    assert!(logs.contains(&format!("moving {name} to node")), "{logs}");
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    let all = activations(&nodes, &name);
    assert_placements_never_overlap(&all, &name);
    eprintln!("widen: activations {all:?}");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_partitioned_node_gives_its_job_up_before_the_majority_runs_it() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("partition", 600_000, 9);
    let nodes = cluster(&dir, &secret, 3);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    // Two shards: the job runs over two nodes.
    let (name, placed) = submit_over_two(&addrs, &secret, &dir, &events_path, 150_000);
    let owner_id = job(&placed, &name)["node"].as_u64().unwrap();
    let owner = nodes.iter().position(|n| n.id() == owner_id).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // Cut the owner off; the others carry on.
    std::fs::write(&nodes[owner].isolate, b"").unwrap();
    let majority: Vec<&str> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner)
        .map(|(_, n)| n.addr.as_str())
        .collect();
    let done = wait_for(
        &majority,
        &secret,
        Duration::from_secs(120),
        "q5 finished",
        |s| job(s, &name)["state"] == "finished",
    );
    // Over the two nodes of the majority.
    let now = placement(&done, &name);
    assert_eq!(now.len(), 2, "{done}");
    assert!(!now.contains(&owner_id), "{done}");
    // Heal; the cut-off node learns the job moved and does not run it.
    let healed = monotonic_ns();
    std::fs::remove_file(&nodes[owner].isolate).unwrap();
    wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "all alive again",
        |s| alive_nodes(s) == 3,
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    let all = activations(&nodes, &name);
    assert!(
        all.len() >= 2,
        "q5 ran on the owner, then elsewhere: {all:?}"
    );
    // The owner ran only the first placement, and nothing of it after the
    // heal.
    for a in all.iter().filter(|a| a.node == owner) {
        assert_eq!(a.epoch, 1, "{all:?}");
        assert!(a.stopped.is_some_and(|t| t < healed), "{all:?}");
    }
    assert!(all.iter().any(|a| a.node != owner && a.epoch >= 2));
    assert_placements_never_overlap(&all, &name);
    assert_each_part_started_once(&all, &name);
    let owner_log = nodes[owner].log();
    assert!(
        owner_log.contains("(no lease)"),
        "the owner stopped its run for want of a lease"
    );
    eprintln!("partition: activations {all:?}");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_secret_or_cluster_is_refused_and_never_listed() {
    let _one = one_at_a_time();
    let dir = temp_dir("auth");
    let secret = write_secret(&dir, "secret", SECRET);
    let wrong = write_secret(&dir, "wrong", "another secret, also long");
    let nodes = cluster(&dir, &secret, 1);
    let addr = nodes[0].addr.clone();
    // A node with the wrong secret asks to join.
    let intruder = NodeProcess::start(&dir, "intruder", &wrong, Some(&addr));
    // A node of another cluster, with the right secret.
    let mut other = dirigo();
    let other_log = dir.join("other.log");
    let mut other = other
        .args([
            "node",
            "--listen",
            &free_addr(),
            "--cluster",
            "other",
            "--join",
            &addr,
        ])
        .arg("--data-dir")
        .arg(dir.join("other"))
        .arg("--secret-file")
        .arg(&secret)
        .stderr(std::fs::File::create(&other_log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let s = status(&addr, &secret).expect("status with the right secret");
        assert_eq!(s["nodes"].as_array().unwrap().len(), 1, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = other.kill();
    let _ = other.wait();
    let log = nodes[0].log();
    let refusals = log.matches("refused a connection from 127.0.0.1").count();
    assert!(refusals >= 2, "both refusals logged: {log}");
    assert!(
        intruder.log().contains("joining through"),
        "{}",
        intruder.log()
    );
    // A client with the wrong secret, or of another cluster.
    for (secret_file, cluster) in [(&wrong, "dirigo"), (&secret, "other")] {
        let out = client("status", &addr, secret_file, &dir, &["--cluster", cluster]);
        assert_eq!(out.status.code(), Some(1));
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(error.contains(&format!("connecting to {addr}")), "{error}");
        let args = ["--cluster", cluster, "q0", "--data-dir=d", "--cores=1"];
        let submit = client("submit", &addr, secret_file, &dir, &args);
        assert_eq!(submit.status.code(), Some(1));
    }
    let s = status(&addr, &secret).unwrap();
    assert_eq!(
        s["jobs"].as_array().unwrap().len(),
        0,
        "nothing submitted: {s}"
    );
    drop(intruder);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cancel_stops_a_job_and_bad_submissions_are_refused() {
    let _one = one_at_a_time();
    let dir = temp_dir("cancel");
    let secret = write_secret(&dir, "secret", SECRET);
    let nodes = cluster(&dir, &secret, 2);
    let addr = nodes[0].addr.clone();
    let flags = [
        "--events=100000000",
        "--rate=100000",
        "--data-dir=d1",
        "--cores=1",
    ];
    let name = submit(&addr, &secret, &dir, "q1", &flags);
    assert_eq!(name, "q1-1");
    let addrs = [addr.as_str(), nodes[1].addr.as_str()];
    wait_for(&addrs, &secret, Duration::from_secs(20), "q1 placed", |s| {
        job(s, &name)["node"].as_u64().is_some()
    });
    // The same data directory again: refused, naming the job that has it.
    let clash = client(
        "submit",
        &addr,
        &secret,
        &dir,
        &["q1", "--data-dir=d1", "--cores=1"],
    );
    assert_eq!(clash.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&clash.stderr).contains("q1-1"));
    for (flags, says) in [
        (vec!["q9", "--data-dir=x", "--cores=1"], "unknown query"),
        (vec!["q1", "--cores=1"], "--data-dir"),
        (vec!["q1", "--data-dir=x"], "--cores"),
        (
            vec!["q1", "--data-dir=x", "--cores=1", "--fresh"],
            "--fresh",
        ),
        (
            vec!["q1", "--data-dir=x", "--cores=1", "--rate=fast"],
            "--rate",
        ),
    ] {
        let out = client("submit", &addr, &secret, &dir, &flags);
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(error.contains(says), "{flags:?}: {error}");
    }
    let cancel = client("cancel", &addr, &secret, &dir, &[&name]);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let s = wait_for(&addrs, &secret, Duration::from_secs(10), "cancelled", |s| {
        job(s, &name)["state"] == "cancelled"
    });
    // Its run is stopped: the activation log says so.
    let start = Instant::now();
    loop {
        let all = activations(&nodes, &name);
        if all.len() == 1 && all[0].stopped.is_some() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{all:?} {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = client("cancel", &addr, &secret, &dir, &[&name]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("cancelled already"));
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node joins a cluster whose log holds more than a link frame takes in
/// one message (long job flags, reports): it catches up in bounded Raft
/// messages; a second node on the same data directory is refused.
#[test]
fn a_node_joins_a_cluster_with_a_long_history() {
    let _one = one_at_a_time();
    let dir = temp_dir("history");
    let secret = write_secret(&dir, "secret", SECRET);
    let nodes = cluster(&dir, &secret, 1);
    let addr = nodes[0].addr.clone();
    // 40 short jobs, each with a data directory 1,500 bytes long.
    let names = long_named_jobs(&addr, &secret, &dir, 40, 750);
    let log_bytes = std::fs::metadata(dir.join("n1/raft.log")).unwrap().len();
    assert!(log_bytes > 65_536, "the log holds {log_bytes} bytes");
    let second = NodeProcess::start(&dir, "n2", &secret, Some(&addr));
    let both = [addr.as_str(), second.addr.as_str()];
    let s = wait_for(
        &both[1..],
        &secret,
        Duration::from_secs(30),
        "the second caught up",
        |s| alive_nodes(s) == 2 && names.iter().all(|n| job(s, n)["state"] == "finished"),
    );
    // Its status lists what fits a reply and counts the rest.
    let listed = s["jobs"].as_array().unwrap().len() as u64;
    assert_eq!(listed + s["jobs_omitted"].as_u64().unwrap(), 40, "{s}");
    // A second node on n1's data directory is refused.
    let out = dirigo()
        .args(["node", "--listen", &free_addr()])
        .arg("--data-dir")
        .arg(dir.join("n1"))
        .arg("--secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("another running node"), "{error}");
    drop(second);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node taken out of the cluster (`dirigo remove`) while it runs q5:
/// it holds no lease from then on, so it stops its run; the job moves to
/// another node once that lease has surely ended, resumes from its
/// checkpoint and ends with the exact output; the node leaves the
/// membership and exits, and no two runs of q5 were ever alive at once.
#[test]
fn a_removed_node_hands_its_job_over_and_leaves() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("remove", 1_000_000, 17);
    let mut nodes = cluster(&dir, &secret, 3);
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let flags = file_job(&events_path, "q5", 250_000);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let q5 = submit(&addrs[0], &secret, &dir, "q5", &flags);
    let placed = wait_for(
        &[&addrs[0]],
        &secret,
        Duration::from_secs(20),
        "q5 placed",
        |s| job(s, &q5)["node"].as_u64().is_some(),
    );
    let owner_id = job(&placed, &q5)["node"].as_u64().unwrap();
    let owner = nodes.iter().position(|n| n.id() == owner_id).unwrap();
    let other = (owner + 1) % 3;
    // Refused: a node that is no member.
    let out = client("remove", &addrs[other], &secret, &dir, &["12345"]);
    assert_eq!(out.status.code(), Some(1));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("node 12345 is no member"), "{error}");
    // Let the run take checkpoints, then take its node out.
    std::thread::sleep(Duration::from_millis(1500));
    let owner_text = owner_id.to_string();
    let out = client("remove", &addrs[other], &secret, &dir, &[&owner_text]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is leaving"));
    let again = client("remove", &addrs[other], &secret, &dir, &[&owner_text]);
    assert_eq!(again.status.code(), Some(1));
    let staying: Vec<&str> = (0..3)
        .filter(|i| *i != owner)
        .map(|i| addrs[i].as_str())
        .collect();
    let done = wait_for(
        &staying,
        &secret,
        Duration::from_secs(120),
        "q5 finished elsewhere, the node gone, a leader known",
        |s| {
            job(s, &q5)["state"] == "finished"
                && s["leader"].as_u64().unwrap_or(0) != 0
                && s["nodes"]
                    .as_array()
                    .is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["id"] != owner_id))
        },
    );
    assert_ne!(job(&done, &q5)["node"].as_u64(), Some(owner_id));
    assert!(
        job(&done, &q5)["checkpoints"]["resumed_from"]
            .as_u64()
            .is_some(),
        "q5 resumed from a checkpoint: {done}"
    );
    // The removed node stopped by itself, cleanly.
    let status = nodes[owner].exited_within(Duration::from_secs(20), "the removed node");
    assert!(status.success(), "{status}: {}", nodes[owner].log());
    assert!(
        nodes[owner]
            .log()
            .contains("left the cluster (its removal a"),
        "{}",
        nodes[owner].log()
    );
    // Its data directory is not taken up again: a node started on it
    // refuses, saying why.
    let mut again = NodeProcess::start(&dir, &format!("n{}", owner + 1), &secret, None);
    let status = again.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{}", again.log());
    assert!(again.log().contains("left its cluster"), "{}", again.log());
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    let runs = activations(&nodes, &q5);
    assert!(runs.len() >= 2, "{runs:?}");
    assert_placements_never_overlap(&runs, &q5);
    // Of the two left, the leader is taken out: it hands the lead to the
    // other, which then stands alone; the last cannot leave.
    let leader_id = done["leader"].as_u64().unwrap();
    let leader = nodes.iter().position(|n| n.id() == leader_id).unwrap();
    let last = (0..3).find(|i| *i != owner && *i != leader).unwrap();
    let leader_text = leader_id.to_string();
    let out = client("remove", &addrs[last], &secret, &dir, &[&leader_text]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last_id = nodes[last].id();
    wait_for(
        &[&addrs[last]],
        &secret,
        Duration::from_secs(30),
        "the last node alone, leading",
        |s| {
            s["leader"].as_u64() == Some(last_id)
                && s["nodes"].as_array().is_some_and(|n| n.len() == 1)
        },
    );
    nodes[leader].exited_within(Duration::from_secs(20), "the removed leader");
    assert!(nodes[leader].log().contains("handing the lead to node"));
    let last_text = last_id.to_string();
    let out = client("remove", &addrs[last], &secret, &dir, &[&last_text]);
    assert_eq!(out.status.code(), Some(1));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("the last member staying"), "{error}");
    drop(nodes.drain(..));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The consensus log is compacted: once `--compact-every` entries were
/// applied past the last snapshot, a node keeps a snapshot of the state and
/// the entries after it only. A node that joins later, past what the leader
/// keeps, gets the snapshot (over 64 KiB here: in parts, each within a
/// frame), and a node restarted on its data directory starts from its own.
#[test]
fn the_log_is_compacted_and_a_late_node_starts_from_a_snapshot() {
    let _one = one_at_a_time();
    let dir = temp_dir("compact");
    let secret = write_secret(&dir, "secret", SECRET);
    let every = 16;
    let compact = ["--compact-every", "16"];
    let first = NodeProcess::start_with(&dir, "n1", &secret, None, &free_addr(), &compact);
    let addr = first.addr.clone();
    wait_for(
        &[&addr],
        &secret,
        Duration::from_secs(20),
        "the first node",
        |s| alive_nodes(s) == 1,
    );
    // 45 short jobs, each with a data directory 1,800 bytes long: a state
    // of over 64 KiB.
    let names = long_named_jobs(&addr, &secret, &dir, 45, 900);
    // Three entries a job at least (submit, place, end): compacted often.
    let compactions = first.log().matches("compacted the consensus log").count();
    assert!(compactions >= 45 * 3 / every, "{}", first.log());
    // What n1's log file holds: a snapshot, and fewer entries after it
    // than make the next one (read from a copy: n1 is running).
    let copy = dir.join("n1-raft.log");
    std::fs::copy(dir.join("n1/raft.log"), &copy).unwrap();
    let (_, replayed) = dirigo_storage::raftlog::RaftLog::open(&copy).unwrap();
    let (at, _) = replayed.snapshot.expect("a snapshot in n1's log");
    let entries = replayed.entries.len() as u64;
    assert!(
        at + entries >= 45 * 3,
        "a snapshot through entry {at} and {entries} entries: not the whole history"
    );
    assert!(
        replayed.entries.len() < every + 4,
        "{} entries after the snapshot",
        replayed.entries.len()
    );
    // A node joins: n1 no longer has the entries from the start, so the
    // new node must install its snapshot.
    let second_addr = free_addr();
    let second = NodeProcess::start_at(&dir, "n2", &secret, Some(&addr), &second_addr);
    let caught_up =
        |s: &Value| alive_nodes(s) == 2 && names.iter().all(|n| job(s, n)["state"] == "finished");
    wait_for(
        &[&second_addr],
        &secret,
        Duration::from_secs(30),
        "the second caught up",
        caught_up,
    );
    let log = second.log();
    let installed = log
        .lines()
        .find_map(|line| {
            line.split_once("installed the leader's snapshot through entry ")
                .and_then(|(_, rest)| rest.split_once(" ("))
                .and_then(|(_, bytes)| bytes.split(' ').next())
                .and_then(|bytes| bytes.parse::<usize>().ok())
        })
        .unwrap_or_else(|| panic!("n2 installed no snapshot: {log}"));
    assert!(installed > 65_536, "a snapshot of {installed} bytes only");
    // n2 restarted: it starts from its own snapshot, and knows every job.
    drop(second);
    let second = NodeProcess::start_at(&dir, "n2", &secret, Some(&addr), &second_addr);
    wait_for(
        &[&second_addr],
        &secret,
        Duration::from_secs(30),
        "the second restarted",
        caught_up,
    );
    let log = second.log();
    assert!(
        log.lines()
            .next()
            .unwrap_or_default()
            .contains("a snapshot through entry"),
        "{log}"
    );
    drop(second);
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node restarted on another address, on its data directory, is
/// reached again: it tells a member its new address, the cluster agrees on
/// it, and the others dial it there. The node restarted is the one with
/// the highest id, which the others dial (the lower id dials): without
/// telling them, it would never be reached.
#[test]
fn a_node_restarted_on_another_address_is_reached_again() {
    let _one = one_at_a_time();
    let dir = temp_dir("moved");
    let secret = write_secret(&dir, "secret", SECRET);
    let mut nodes = cluster(&dir, &secret, 3);
    let highest = (0..3).max_by_key(|&i| nodes[i].id()).unwrap();
    let moved_id = nodes[highest].id();
    let name = format!("n{}", highest + 1);
    drop(nodes.remove(highest));
    let new_addr = free_addr();
    nodes.push(NodeProcess::start_at(&dir, &name, &secret, None, &new_addr));
    let at_new_address = |s: &Value| {
        alive_nodes(s) == 3
            && s["nodes"].as_array().is_some_and(|nodes| {
                nodes
                    .iter()
                    .any(|n| n["id"] == moved_id && n["addr"] == new_addr.as_str())
            })
    };
    let others = [nodes[0].addr.as_str(), nodes[1].addr.as_str()];
    wait_for(
        &others,
        &secret,
        Duration::from_secs(20),
        "the others list it at its new address, alive",
        at_new_address,
    );
    // It hears the leader again (the others reach it).
    wait_for(
        &[&new_addr],
        &secret,
        Duration::from_secs(20),
        "it follows a leader",
        |s| at_new_address(s) && s["leader"].as_u64().unwrap_or(0) != 0,
    );
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two jobs on a one-node cluster; a second node joins, and the leader
/// moves one job to it: the old run stops before the new one starts, the
/// moved job resumes from its checkpoint, and both outputs are exact.
#[test]
fn a_joining_node_takes_a_job_from_a_busy_one() {
    let _one = one_at_a_time();
    let dir = temp_dir("rebalance");
    let secret = write_secret(&dir, "secret", SECRET);
    let (events_path, events) = input(&dir, 1_000_000, 13);
    let plain: BTreeMap<&str, Vec<String>> = ["q5", "q8"]
        .into_iter()
        .map(|q| (q, uninterrupted(&dir, q, &events_path)))
        .collect();
    let mut nodes = cluster(&dir, &secret, 1);
    let first = nodes[0].addr.clone();
    let mut names = BTreeMap::new();
    for query in ["q5", "q8"] {
        let flags = file_job(&events_path, query, 200_000);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        names.insert(query, submit(&first, &secret, &dir, query, &flags));
    }
    wait_for(
        &[&first],
        &secret,
        Duration::from_secs(20),
        "both placed",
        |s| names.values().all(|n| job(s, n)["epoch"] == 1),
    );
    std::thread::sleep(Duration::from_millis(1200));
    nodes.push(NodeProcess::start(&dir, "n2", &secret, Some(&first)));
    let second_id = nodes[1].id();
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let spread = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "a job moved",
        |s| {
            names
                .values()
                .any(|n| job(s, n)["node"].as_u64() == Some(second_id))
        },
    );
    let moved = names
        .values()
        .find(|n| job(&spread, n)["node"].as_u64() == Some(second_id))
        .unwrap()
        .clone();
    assert_eq!(job(&spread, &moved)["epoch"], 2, "{spread}");
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(120),
        "both finished",
        |s| names.values().all(|n| job(s, n)["state"] == "finished"),
    );
    // The moved job did not start over: it resumed from a checkpoint.
    let resumed = &job(&done, &moved)["checkpoints"]["resumed_from"];
    assert!(resumed.as_u64().is_some(), "{moved} resumed: {done}");
    for query in ["q5", "q8"] {
        assert_exact(
            query,
            &dir.join(format!("{query}.jsonl")),
            &plain[query],
            &events,
        );
    }
    let all = activations(&nodes, &moved);
    // Its runs on the first node were of the first placement, those on
    // the second of a later one, and no two were alive at once.
    assert!(all.iter().any(|a| a.node == 1), "{all:?}");
    for a in &all {
        assert_eq!(a.epoch == 1, a.node == 0, "{all:?}");
    }
    assert_placements_never_overlap(&all, &moved);
    eprintln!("rebalance: {moved} moved, resumed from checkpoint {resumed}; {all:?}");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CPU of each node's runs, as the leader sees it: a node whose run
/// is busy (q5 at full speed) gets no new job while other nodes' runs are
/// light (q1 at 1,000 events/s), though every node runs one part (by parts
/// alone the lowest id, the busy one, was next); status shows the figures.
#[test]
fn a_new_job_goes_to_the_node_whose_runs_use_the_least_cpu() {
    let _one = one_at_a_time();
    let dir = temp_dir("cpu");
    let secret = write_secret(&dir, "secret", SECRET);
    let nodes = cluster(&dir, &secret, 3);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let first = addrs[0];
    let light = |data_dir: &str| {
        vec![
            "--events=100000000".to_string(),
            "--rate=1000".to_string(),
            format!("--data-dir={data_dir}"),
            "--cores=1".to_string(),
        ]
    };
    let busy_flags = ["--events=1000000000", "--data-dir=busy", "--cores=1"];
    let busy = submit(first, &secret, &dir, "q5", &busy_flags);
    let placed = |s: &Value, name: &str| job(s, name)["node"].as_u64();
    let status = wait_for(&addrs, &secret, Duration::from_secs(20), "q5 placed", |s| {
        placed(s, &busy).is_some()
    });
    let busy_node = placed(&status, &busy).unwrap();
    let mut lights = Vec::new();
    for data_dir in ["l1", "l2"] {
        let flags = light(data_dir);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let name = submit(first, &secret, &dir, "q1", &flags);
        wait_for(&addrs, &secret, Duration::from_secs(20), "q1 placed", |s| {
            placed(s, &name).is_some()
        });
        lights.push(name);
    }
    // One part on each node.
    let cpu_of = |s: &Value, node: u64| {
        s["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == node))
            .and_then(|n| n["cpu_milli"].as_u64())
    };
    let measured = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(20),
        "the leader sees the busy run the busiest",
        |s| {
            let mut spread: Vec<u64> = std::iter::once(&busy)
                .chain(&lights)
                .filter_map(|name| placed(s, name))
                .collect();
            spread.sort_unstable();
            spread.dedup();
            let busy_cpu = cpu_of(s, busy_node).unwrap_or(0);
            // The light jobs' figures (from their nodes' reports, or the
            // leader's own meter where one runs on the leader).
            let lights_measured = lights.iter().all(|n| job(s, n)["cpu_milli"].is_u64());
            spread.len() == 3
                && lights_measured
                && busy_cpu >= 400
                && spread
                    .iter()
                    .filter(|n| **n != busy_node)
                    .all(|n| cpu_of(s, *n).is_some_and(|c| c + 200 <= busy_cpu))
        },
    );
    assert!(
        job(&measured, &busy)["cpu_milli"].as_u64().unwrap_or(0) >= 400,
        "{measured}"
    );
    let flags = light("l3");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let third = submit(first, &secret, &dir, "q1", &flags);
    let status = wait_for(&addrs, &secret, Duration::from_secs(20), "q1 placed", |s| {
        placed(s, &third).is_some()
    });
    assert_ne!(
        placed(&status, &third),
        Some(busy_node),
        "{measured}\n{status}"
    );
    // Nothing moved, 2.5 s later either (the third part measured by
    // then): the busy node's one part is larger than the gap it makes
    // (moved, it would only turn it around), and no node runs two parts
    // more than another.
    std::thread::sleep(Duration::from_millis(2500));
    let later = wait_for(&addrs, &secret, Duration::from_secs(5), "status", |s| {
        s["leader"] == s["node"]
    });
    for name in std::iter::once(&busy).chain(&lights).chain([&third]) {
        assert_eq!(job(&later, name)["epoch"], 1, "{later}");
    }
    for name in std::iter::once(&busy).chain(&lights).chain([&third]) {
        let out = client("cancel", first, &secret, &dir, &[name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job over two nodes that runs through: its figures in `status` are
/// both parts' (each part's node puts its summary in the log): every
/// event of the file counted once, every row written counted, both
/// nodes' shards.
#[test]
fn a_job_over_two_nodes_reports_the_figures_of_both_parts() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("figures", 200_000, 29);
    let nodes = cluster(&dir, &secret, 2);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let (name, _) = submit_over_two(&addrs, &secret, &dir, &events_path, 1_000_000);
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(60),
        "q5 finished with both parts' figures",
        |s| job(s, &name)["state"] == "finished" && job(s, &name)["parts_reported"] == 2,
    );
    let figures = job(&done, &name);
    // It ran through in its first placement: no part ran twice.
    assert_eq!(figures["epoch"], 1, "{done}");
    assert_eq!(
        figures["events"].as_u64(),
        Some(events.len() as u64),
        "{done}"
    );
    assert_eq!(
        figures["outputs"].as_u64(),
        Some(plain.len() as u64),
        "{done}"
    );
    assert_eq!(figures["cores"].as_u64(), Some(2), "{done}");
    // Each part runs its node's autoscaler over its one shard: nothing to
    // move to, and the parts' counts added up.
    assert_eq!(figures["scale_actions"].as_u64(), Some(0), "{done}");
    let per_s = figures["events_per_s"].as_f64().unwrap();
    let elapsed_s = figures["elapsed_s"].as_f64().unwrap();
    assert!(
        (per_s * elapsed_s - events.len() as f64).abs() < 1.0,
        "{done}"
    );
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A light q5 of two shards placed over two of three nodes, each node
/// telling the leader its cores: once it has fit on one node with half
/// its cores to spare for the time asked (1.5 s here, 30 s by default),
/// the leader narrows it onto one node, where it resumes from its
/// checkpoint and ends exact, never run in two placements at once. A q1
/// as light beside it, with an SLO no run meets (10 us), tells the leader
/// its latency and is never narrowed: it runs on two nodes to its end,
/// exact.
#[test]
fn a_light_job_over_two_nodes_is_narrowed_onto_one_and_ends_exact() {
    let _one = one_at_a_time();
    let Q5Input {
        dir,
        secret,
        events_path,
        events,
        plain,
    } = q5_input("narrow", 100_000, 31);
    let q1_plain = uninterrupted(&dir, "q1", &events_path);
    let nodes = cluster_with(&dir, &secret, 3, &["--narrow-after-ms=1500"]);
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let (name, _) = submit_over_two(&addrs, &secret, &dir, &events_path, 5_000);
    let mut late_flags = over_two(file_job(&events_path, "q1", 5_000));
    late_flags.push("--slo=10us".into());
    let late_flags: Vec<&str> = late_flags.iter().map(String::as_str).collect();
    let late = submit(addrs[1], &secret, &dir, "q1", &late_flags);
    // Every status seen: the late job on two nodes (once placed), and the
    // most of its SLO its latency was said to take.
    let q1_widths = std::cell::RefCell::new(BTreeSet::new());
    let q1_of_slo = std::cell::Cell::new(0.0f64);
    let watch = |s: &Value| {
        let q1 = job(s, &late);
        let width = placement(s, &late).len();
        if q1["state"] == "running" && width > 0 {
            q1_widths.borrow_mut().insert(width);
        }
        if let Some(of_slo) = q1["latency_p99_of_slo"].as_f64() {
            q1_of_slo.set(q1_of_slo.get().max(of_slo));
        }
    };
    let narrowed = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(30),
        "q5 narrowed onto one node",
        |s| {
            watch(s);
            placement(s, &name).len() == 1
        },
    );
    // The leader knows every node's cores (they come with the lease
    // requests; its own from the start).
    let leader = narrowed["leader"].as_u64().unwrap();
    let at_leader = addrs
        .iter()
        .filter_map(|a| status(a, &secret))
        .find(|s| s["node"].as_u64() == Some(leader))
        .expect("the leader answers");
    let cores: Vec<Option<u64>> = at_leader["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["cores"].as_u64())
        .collect();
    assert_eq!(cores.len(), 3, "{at_leader}");
    assert!(cores.iter().all(|c| c >= &Some(1)), "{at_leader}");
    // The leader's human status shows each node's cores and q1's latency
    // against its SLO (once its figures are in: within 10 s).
    let leader_addr = nodes
        .iter()
        .find(|n| n.id() == leader)
        .map(|n| n.addr.clone())
        .unwrap();
    let started = Instant::now();
    let human = loop {
        let out = client("status", &leader_addr, &secret, &dir, &[]);
        let human = String::from_utf8_lossy(&out.stdout).to_string();
        let q1_line = human.lines().find(|l| l.contains(&late)).unwrap_or("");
        if q1_line.contains(" of its SLO") || started.elapsed() > Duration::from_secs(10) {
            break human;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let q1_line = human.lines().find(|l| l.contains(&late)).unwrap_or("");
    assert!(q1_line.contains(" of its SLO"), "{human}");
    let node_lines = human.lines().filter(|l| l.starts_with("node "));
    assert_eq!(
        node_lines
            .filter(|l| l.contains(", runs use ") && l.ends_with(" cores"))
            .count(),
        3,
        "{human}"
    );
    let done = wait_for(
        &addrs,
        &secret,
        Duration::from_secs(120),
        "q5 and q1 finished",
        |s| {
            watch(s);
            job(s, &name)["state"] == "finished" && job(s, &late)["state"] == "finished"
        },
    );
    assert_eq!(placement(&done, &name).len(), 1, "{done}");
    assert_eq!(job(&done, &name)["epoch"], 2, "{done}");
    assert!(
        job(&done, &name)["checkpoints"]["resumed_from"]
            .as_u64()
            .is_some(),
        "{done}"
    );
    let logs: String = nodes.iter().map(NodeProcess::log).collect();
    assert!(
        logs.contains(&format!("moving {name} to node"))
            && logs.contains("(narrowing it from 2 nodes onto 1: its parts use"),
        "{logs}"
    );
    // Narrowed once, and not widened again: its node never saturated.
    assert!(!logs.contains("widening it"), "{logs}");
    for line in logs.lines().filter(|l| l.contains("(narrowing it")) {
        eprintln!("narrow: {line}");
    }
    assert_exact("q5", &dir.join("q5.jsonl"), &plain, &events);
    let all = activations(&nodes, &name);
    assert_placements_never_overlap(&all, &name);
    eprintln!("narrow: activations {all:?}");
    // The late job: its latency seen over its SLO, never narrowed, on two
    // nodes whenever it ran (moved off a busy node for its latency, it
    // may be, still over two).
    let moves: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(&format!("moving {late} to node")))
        .collect();
    eprintln!(
        "narrow: {late}: p99 up to {:.1} of its SLO; widths {:?}; moves {moves:?}",
        q1_of_slo.get(),
        q1_widths.borrow()
    );
    assert!(q1_of_slo.get() > 1.0, "{done}");
    assert_eq!(*q1_widths.borrow(), BTreeSet::from([2]), "{logs}");
    assert!(moves.iter().all(|m| !m.contains("(narrowing")), "{moves:?}");
    assert_exact("q1", &dir.join("q1.jsonl"), &q1_plain, &events);
    assert_placements_never_overlap(&activations(&nodes, &late), &late);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

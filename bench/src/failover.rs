//! `failover_ms` of `dirigo bench net`: three `dirigo node` processes on
//! loopback run a paced q1 into an exactly-once file sink; the node running
//! it is killed with SIGKILL, and the clock runs from the kill until the
//! job is processing again: until the output file grows past what it held
//! when the killed node's run was gone, and past what its last committed
//! checkpoint brings it to (a resumed run first appends those rows, if
//! the killed one had not: no processing). That takes another node placing
//! the job, starting its run, restoring the last checkpoint, processing
//! and committing the next one (`CHECKPOINT_INTERVAL` apart). Also timed:
//! until the cluster's status shows the job placed anew (`placed_ms`).
//!
//! With two shards the job runs over two of the three nodes, and the node
//! killed is its part 0's (the one writing the output): the job is placed
//! anew over the two nodes left, both parts started and resumed.
//!
//! Everything goes through the binary as a user would run it: `node`,
//! `submit`, `status --json`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::BenchError;

const SECRET: &str = "dirigo bench failover: not a production secret";
/// Between the job's checkpoints (and so its output's commits).
const CHECKPOINT_INTERVAL: &str = "100ms";
/// Bound on each wait; past it the measurement fails.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Serialize)]
pub struct FailoverSample {
    pub run: usize,
    /// The job's shards (`--cores`): 2 runs it over two nodes.
    pub shards: u32,
    /// From the kill until the output grew again.
    pub failover_ms: f64,
    /// From the kill until the status showed the job on another node (the
    /// status is polled every 20 ms or so, each poll a `dirigo status`
    /// process: an upper bound).
    pub placed_ms: f64,
    /// The killed node was the leader (an election came first).
    pub leader_killed: bool,
}

struct NodeProcess {
    addr: String,
    child: Child,
    log: PathBuf,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's id, from its first log line.
    fn id(&self) -> Option<u64> {
        self.log()
            .lines()
            .next()?
            .strip_prefix("dirigo node ")?
            .split(':')
            .next()?
            .parse()
            .ok()
    }
}

fn free_addr() -> Result<String, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError(format!("failover: a free port: {e}")))?;
    Ok(listener
        .local_addr()
        .map_err(|e| BenchError(format!("failover: a free port: {e}")))?
        .to_string())
}

struct Bench<'a> {
    program: &'a Path,
    dir: PathBuf,
    secret: PathBuf,
}

impl Bench<'_> {
    fn start_node(&self, name: &str, join: Option<&str>) -> Result<NodeProcess, BenchError> {
        let addr = free_addr()?;
        let log = self.dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)
            .map_err(|e| BenchError(format!("failover: {}: {e}", log.display())))?;
        let mut command = Command::new(self.program);
        command
            .args(["node", "--listen", &addr])
            .arg("--data-dir")
            .arg(self.dir.join(name))
            .arg("--secret-file")
            .arg(&self.secret)
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(join) = join {
            command.args(["--join", join]);
        }
        let child = command
            .spawn()
            .map_err(|e| BenchError(format!("failover: starting a node: {e}")))?;
        Ok(NodeProcess { addr, child, log })
    }

    fn client(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(self.program)
            .current_dir(&self.dir)
            .arg(args[0])
            .arg("--secret-file")
            .arg(&self.secret)
            .args(&args[1..])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn status(&self, addr: &str) -> Option<serde_json::Value> {
        let out = self.client(&["status", "--json", "--to", addr]).ok()?;
        serde_json::from_str(out.lines().last()?).ok()
    }

    /// Poll the status of any node in `addrs` until `done` holds.
    fn wait_for(
        &self,
        addrs: &[&str],
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, BenchError> {
        let start = Instant::now();
        while start.elapsed() < WAIT_LIMIT {
            for addr in addrs {
                if let Some(status) = self.status(addr) {
                    if done(&status) {
                        return Ok(status);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(BenchError(format!(
            "failover: {what}: not within {WAIT_LIMIT:?} (logs in {})",
            self.dir.display()
        )))
    }
}

fn alive(status: &serde_json::Value) -> usize {
    status["nodes"]
        .as_array()
        .map_or(0, |n| n.iter().filter(|n| n["alive"] == true).count())
}

fn job<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// One measurement (see the module header).
pub fn measure(program: &Path, run: usize, shards: u32) -> Result<FailoverSample, BenchError> {
    let dir = std::env::temp_dir().join(format!(
        "dirigo-bench-failover-{}-{run}-{shards}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError(format!("failover: {}: {e}", dir.display())))?;
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET)
        .map_err(|e| BenchError(format!("failover: {}: {e}", secret.display())))?;
    let bench = Bench {
        program,
        dir: dir.clone(),
        secret,
    };
    let result = measure_in(&bench, run, shards);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// A job's nodes in a status, part 0 first.
fn placement(status: &serde_json::Value, name: &str) -> Vec<u64> {
    let job = job(status, name);
    job["node"]
        .as_u64()
        .into_iter()
        .chain(
            job["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_u64),
        )
        .collect()
}

fn measure_in(bench: &Bench, run: usize, shards: u32) -> Result<FailoverSample, BenchError> {
    let first = bench.start_node("n1", None)?;
    let seed = first.addr.clone();
    bench.wait_for(&[&seed], "the first node up", |s| alive(s) == 1)?;
    let mut nodes = vec![first];
    for i in 2..=3 {
        nodes.push(bench.start_node(&format!("n{i}"), Some(&seed))?);
    }
    bench.wait_for(&[&seed], "three voting nodes", |s| {
        let voters = s["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["voter"] == true).count());
        alive(s) == 3 && voters == 3 && s["leader"].as_u64().unwrap_or(0) != 0
    })?;
    let interval = format!("--checkpoint-interval={CHECKPOINT_INTERVAL}");
    let cores = format!("--cores={shards}");
    let name = bench
        .client(&[
            "submit",
            "--to",
            &seed,
            "q1",
            "--events=1000000000",
            "--rate=200000",
            "--sink=file:out.jsonl",
            "--data-dir=data",
            &cores,
            &interval,
        ])
        .map_err(|e| BenchError(format!("failover: submit: {e}")))?
        .trim()
        .to_string();
    let out = bench.dir.join("out.jsonl");
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    // Two shards over three nodes: two nodes of one shard each.
    let parts = if shards == 2 { 2 } else { 1 };
    let placed = bench.wait_for(&addr_refs, "the job placed", |s| {
        placement(s, &name).len() == parts
    })?;
    let start = Instant::now();
    while file_len(&out) == 0 {
        if start.elapsed() > WAIT_LIMIT {
            return Err(BenchError("failover: the job wrote no row".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // A few checkpoints in.
    std::thread::sleep(Duration::from_millis(500));
    let owner_id = job(&placed, &name)["node"].as_u64();
    let leader_killed = placed["leader"].as_u64() == owner_id;
    let owner = nodes
        .iter()
        .position(|n| n.id() == owner_id)
        .ok_or_else(|| BenchError("failover: the job's node is none of the three".into()))?;
    // Its latest run of the job (a part that lost a peer may have run
    // again as a later placement).
    let run_pid: Option<u32> = nodes[owner].log().lines().rev().find_map(|line| {
        let rest = line.split(&format!("activation {name} epoch ")).nth(1)?;
        if !rest.contains(" started at ") {
            return None;
        }
        rest.split(" pid ").nth(1)?.split(' ').next()?.parse().ok()
    });
    let mut victim = nodes.remove(owner);
    let killed = Instant::now();
    victim
        .child
        .kill()
        .map_err(|e| BenchError(format!("failover: kill: {e}")))?;
    let _ = victim.child.wait();
    // The killed node's run dies with it; what it committed is the
    // baseline.
    if let Some(pid) = run_pid {
        while !process_gone(pid) && killed.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // What the job had committed: a resumed run first appends the rows of
    // its last checkpoint that the killed one had not appended yet, which
    // is no processing.
    let committed =
        dirigo_engine::dataflow::checkpoint::committed_output_lens(&bench.dir.join("data"))
            .map_err(|e| BenchError(format!("failover: the job's checkpoints: {e}")))?
            .into_iter()
            .filter(|(path, _)| Path::new(path).file_name() == out.file_name())
            .map(|(_, len)| len)
            .max()
            .unwrap_or(0);
    let baseline = file_len(&out).max(committed);
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let mut placed_ms = None;
    let mut last_status = Instant::now();
    let failover_ms = loop {
        if file_len(&out) > baseline {
            break killed.elapsed().as_secs_f64() * 1e3;
        }
        if killed.elapsed() > WAIT_LIMIT {
            return Err(BenchError(format!(
                "failover: the job did not process again within {WAIT_LIMIT:?} (logs in {})",
                bench.dir.display()
            )));
        }
        if placed_ms.is_none() && last_status.elapsed() > Duration::from_millis(20) {
            last_status = Instant::now();
            for addr in &addrs {
                if let Some(s) = bench.status(addr) {
                    if job(&s, &name)["epoch"].as_u64() >= Some(2)
                        && !placement(&s, &name).contains(&owner_id.unwrap_or(0))
                    {
                        placed_ms = Some(killed.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let placed_ms = match placed_ms {
        Some(ms) => ms,
        None => {
            let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            bench.wait_for(&addr_refs, "the job placed again", |s| {
                job(s, &name)["epoch"].as_u64() >= Some(2)
                    && !placement(s, &name).contains(&owner_id.unwrap_or(0))
            })?;
            killed.elapsed().as_secs_f64() * 1e3
        }
    };
    let _ = bench.client(&["cancel", "--to", &addrs[0], &name]);
    drop(nodes);
    drop(victim);
    Ok(FailoverSample {
        run,
        shards,
        failover_ms,
        placed_ms,
        leader_killed,
    })
}

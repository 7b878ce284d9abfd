//! A node runs each job placed on it as a child process: `dirigo run QUERY
//! FLAGS --json`, the same binary, in the directory the job was submitted
//! from. A child dies with its node (`PR_SET_PDEATHSIG`), so a node killed
//! with SIGKILL leaves no run behind; the node stops a child with SIGKILL
//! when it must no longer run it (its lease lapsed, the job moved or was
//! cancelled) and reaps it before it counts the run as stopped. A run
//! resumes from its data directory's last complete checkpoint, so stopping
//! one anywhere loses nothing committed.
//!
//! A job placed on several nodes runs as `dirigo run --nodes ... --node I`
//! on each: part 0 takes the job's checkpoints and writes its output, and
//! reports its end; a part that lost a peer exits with
//! [`EXIT_PEER_LOST`], and its node runs the placement again rather than
//! failing the job; one that could not listen exits with
//! [`EXIT_PORT_TAKEN`], and its node runs the job again on other ports.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::state::{Job, Outcome};
use crate::cli::run::{EXIT_PEER_LOST, EXIT_PORT_TAKEN, LIVE_PREFIX};

/// Lines of a child's stderr kept for the error of a failed run, and the
/// bytes kept of each.
const STDERR_TAIL_LINES: usize = 4;
const STDERR_LINE_BYTES: usize = 512;
/// The largest summary kept of a finished run (it goes into the cluster's
/// log; a longer one is left out).
const REPORT_BYTES_MAX: usize = 8 * 1024;
/// A run's latency counts this long after the last second it had output
/// rows in (a windowed query's part may write a row only every few
/// seconds).
pub const LATENCY_FRESH: std::time::Duration = std::time::Duration::from_secs(3);
/// The most a latency figure says, in thousandths of the SLO (1,000 times it).
const LATENCY_PERMILLE_MAX: u64 = 1_000_000;

/// The monotonic clock in nanoseconds (the same clock in every process of
/// the machine: activation logs of several nodes compare).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One job's run on this node.
pub struct Run {
    pub job: String,
    pub epoch: u64,
    /// Its part of a run over nodes (0 for a run on one node).
    pub part: usize,
    /// A part of a run over nodes.
    pub spans: bool,
    /// When it was started.
    pub started: std::time::Instant,
    child: Child,
    last_stdout: Arc<Mutex<Option<String>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Its latest output latency (`--live`): when, and the p99 in
    /// thousandths of the job's SLO.
    latency: Arc<Mutex<Option<(std::time::Instant, u32)>>>,
    readers: Vec<JoinHandle<()>>,
}

/// This node's part of a run over nodes.
#[derive(Debug, Clone)]
pub struct Part {
    /// Every part's address, in part order.
    pub addrs: Vec<SocketAddr>,
    /// This node's part.
    pub me: usize,
    pub secret_file: PathBuf,
}

/// How a run ended by itself.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    Outcome(Outcome),
    /// A part of a run over nodes lost a peer (why: its last words).
    PeerLost(String),
    /// A part of a run over nodes could not listen: its port is taken.
    PortTaken(String),
}

/// The arguments of the child's `dirigo run`: the job's, its shards
/// (`--cores`) shared out over the parts of a run over nodes.
pub fn run_args(job: &Job, part: Option<&Part>, online: usize) -> Vec<String> {
    let mut args = vec!["run".to_string(), job.query.clone()];
    let mut words = job.args.iter();
    while let Some(word) = words.next() {
        if word == "--cores" {
            words.next();
        } else if !word.starts_with("--cores=") {
            args.push(word.clone());
        }
    }
    let parts = part.map_or(1, |p| p.addrs.len() as u64);
    let shards = (job.shards() / parts).max(1);
    args.push(format!("--cores={shards}"));
    // A placement over fewer nodes (some lost) gives each more shards.
    if shards > online as u64 && !job.args.iter().any(|a| a == "--oversubscribe") {
        args.push("--oversubscribe".into());
    }
    if let Some(part) = part {
        let addrs: Vec<String> = part.addrs.iter().map(SocketAddr::to_string).collect();
        args.push(format!("--nodes={}", addrs.join(",")));
        args.push(format!("--node={}", part.me));
        args.push(format!("--secret-file={}", part.secret_file.display()));
    }
    if !job.args.iter().any(|a| a == "--json") {
        args.push("--json".into());
    }
    // Its latency every second on stderr, for the leader, in place of the
    // progress.
    if !job.args.iter().any(|a| a == "--live") {
        args.push("--live".into());
    }
    // The run claims the data directory for this placement, and commits
    // nothing once a later one has claimed it.
    args.push(format!("--fence-epoch={}", job.epoch));
    args
}

/// The p99 of a `--live` line's figures (of the run's first job; a
/// cluster run has one) in thousandths of its SLO, at most
/// [`LATENCY_PERMILLE_MAX`]; None for another job's, one of an interval
/// without rows, or a line that does not read as figures.
fn latency_permille(figures: &str) -> Option<u32> {
    let figures: serde_json::Value = serde_json::from_str(figures).ok()?;
    let field = |name: &str| figures.get(name).and_then(serde_json::Value::as_u64);
    let (job, rows, p99_us, slo_us) = (
        field("job")?,
        field("rows")?,
        field("p99_us")?,
        field("slo_us")?,
    );
    if job != 0 || rows == 0 || slo_us == 0 {
        return None;
    }
    let permille = u128::from(p99_us) * 1_000 / u128::from(slo_us);
    Some(permille.min(u128::from(LATENCY_PERMILLE_MAX)) as u32)
}

impl Run {
    /// Start `program run ...` for `job`'s placement `epoch`.
    pub fn start(
        program: &Path,
        job: &Job,
        node: u64,
        part: Option<&Part>,
        online: usize,
    ) -> Result<Run, String> {
        let mut command = Command::new(program);
        command
            .args(run_args(job, part, online))
            .current_dir(&job.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls
        // (prctl, getppid, _exit).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The node died before the prctl: no signal will come.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        let last_stdout = Arc::new(Mutex::new(None));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let latency = Arc::new(Mutex::new(None));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let mut readers = Vec::new();
        {
            let last = last_stdout.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    *last.lock().unwrap() = Some(line);
                }
            }));
        }
        {
            let tail = stderr_tail.clone();
            let latest = latency.clone();
            let name = job.name.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // Its latency lines are read, not logged.
                    let shown = line.rsplit('\r').next().unwrap_or("");
                    if let Some(figures) = shown.strip_prefix(LIVE_PREFIX) {
                        if let Some(permille) = latency_permille(figures) {
                            *latest.lock().unwrap() = Some((std::time::Instant::now(), permille));
                        }
                        continue;
                    }
                    eprintln!("dirigo node {node}: {name}: {line}");
                    let mut tail = tail.lock().unwrap();
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    let mut line = line;
                    if line.len() > STDERR_LINE_BYTES {
                        let mut end = STDERR_LINE_BYTES;
                        while !line.is_char_boundary(end) {
                            end -= 1;
                        }
                        line.truncate(end);
                    }
                    tail.push_back(line);
                }
            }));
        }
        Ok(Run {
            job: job.name.clone(),
            epoch: job.epoch,
            part: part.map_or(0, |p| p.me),
            spans: part.is_some(),
            started: std::time::Instant::now(),
            child,
            last_stdout,
            stderr_tail,
            latency,
            readers,
        })
    }

    /// Its output latency p99 in thousandths of its SLO, if it had output
    /// rows within [`LATENCY_FRESH`] of `now`.
    pub fn latency_permille(&self, now: std::time::Instant) -> Option<u32> {
        let latest = *self.latency.lock().unwrap();
        latest
            .filter(|(at, _)| now.saturating_duration_since(*at) < LATENCY_FRESH)
            .map(|(_, permille)| permille)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the run ended, once it has ended by itself.
    pub fn try_end(&mut self) -> Option<RunEnd> {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(e) => {
                return Some(RunEnd::Outcome(Outcome::Failed {
                    error: format!("waiting for the run: {e}"),
                }))
            }
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        if self.spans && status.code() == Some(i32::from(EXIT_PEER_LOST)) {
            return Some(RunEnd::PeerLost(self.last_line()));
        }
        if self.spans && status.code() == Some(i32::from(EXIT_PORT_TAKEN)) {
            return Some(RunEnd::PortTaken(self.last_line()));
        }
        Some(RunEnd::Outcome(self.outcome(status)))
    }

    fn outcome(&self, status: std::process::ExitStatus) -> Outcome {
        if status.success() {
            let report = self
                .last_stdout
                .lock()
                .unwrap()
                .as_deref()
                .filter(|line| line.len() <= REPORT_BYTES_MAX)
                .and_then(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(serde_json::Value::is_object);
            Outcome::Finished { report }
        } else {
            Outcome::Failed {
                error: format!("the run exited with {status}: {}", self.last_words()),
            }
        }
    }

    /// The last line of its stderr.
    fn last_line(&self) -> String {
        self.shown_lines().pop().unwrap_or_default()
    }

    /// The last lines of its stderr.
    fn last_words(&self) -> String {
        self.shown_lines().join(" / ")
    }

    /// The lines of its stderr's tail as a terminal shows them (of each,
    /// what follows its last carriage return: the progress a run redraws
    /// is left out), the empty ones left out.
    fn shown_lines(&self) -> Vec<String> {
        let lines = self.stderr_tail.lock().unwrap();
        lines
            .iter()
            .map(|line| line.rsplit('\r').next().unwrap_or("").trim())
            .filter(|shown| !shown.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// SIGKILL the run (it dies at once, whatever it was doing); [`Run::reap`]
    /// then waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Wait for a killed run: when this returns, it runs no more.
    pub fn reap(mut self) {
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(args: &[&str]) -> Job {
        Job {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..serde_json::from_value(serde_json::json!({
                "name": "q5-1", "query": "q5", "args": [], "cwd": "/", "node": 1,
                "epoch": 4, "state": "running", "report": null, "error": null
            }))
            .unwrap()
        }
    }

    /// A part of a run over nodes runs its share of the job's shards,
    /// oversubscribed past the machine's cores, with the placement's
    /// addresses, its place and the secret.
    #[test]
    fn a_part_runs_its_share_of_the_shards_over_the_placement() {
        let alone = run_args(&job(&["--cores", "4", "--rate=5"]), None, 4);
        assert_eq!(
            alone,
            [
                "run",
                "q5",
                "--rate=5",
                "--cores=4",
                "--json",
                "--live",
                "--fence-epoch=4"
            ]
        );
        // Alone on a machine of fewer cores (the job's other nodes lost).
        let alone = run_args(&job(&["--cores", "4"]), None, 2);
        assert!(alone.contains(&"--oversubscribe".to_string()), "{alone:?}");
        let part = Part {
            addrs: vec![
                "127.0.0.1:7700".parse().unwrap(),
                "127.0.0.1:7701".parse().unwrap(),
            ],
            me: 1,
            secret_file: "/s".into(),
        };
        let args = run_args(&job(&["--cores=4", "--json"]), Some(&part), 1);
        assert_eq!(
            args,
            [
                "run",
                "q5",
                "--json",
                "--cores=2",
                "--oversubscribe",
                "--nodes=127.0.0.1:7700,127.0.0.1:7701",
                "--node=1",
                "--secret-file=/s",
                "--live",
                "--fence-epoch=4"
            ]
        );
        let args = run_args(&job(&["--cores", "4"]), Some(&part), 2);
        assert!(!args.contains(&"--oversubscribe".to_string()), "{args:?}");
        // A job that asks for `--json` or `--live` itself gets each once
        // (the run refuses a flag given twice).
        let args = run_args(&job(&["--live", "--json"]), None, 2);
        for flag in ["--live", "--json"] {
            assert_eq!(args.iter().filter(|a| *a == flag).count(), 1, "{args:?}");
        }
    }

    /// A `--live` line's p99 in thousandths of the SLO, bounded; none
    /// from another job's, an interval without rows, or a line that does
    /// not read as figures.
    #[test]
    fn a_live_line_gives_the_p99_in_thousandths_of_the_slo() {
        let line = |job: u64, rows: u64, p99: u64, slo: u64| {
            format!(r#"{{"job":{job},"rows":{rows},"p99_us":{p99},"slo_us":{slo}}}"#)
        };
        assert_eq!(latency_permille(&line(0, 10, 250, 1_000)), Some(250));
        assert_eq!(latency_permille(&line(0, 1, 3_000, 1_000)), Some(3_000));
        assert_eq!(
            latency_permille(&line(0, 1, u64::MAX, 1)),
            Some(LATENCY_PERMILLE_MAX as u32)
        );
        assert_eq!(latency_permille(&line(1, 10, 250, 1_000)), None);
        assert_eq!(latency_permille(&line(0, 0, 0, 1_000)), None);
        assert_eq!(latency_permille(&line(0, 10, 250, 0)), None);
        for bad in [
            "",
            "{",
            "[]",
            r#"{"job":0,"rows":1}"#,
            r#"{"job":"0","rows":1,"p99_us":1,"slo_us":1}"#,
        ] {
            assert_eq!(latency_permille(bad), None, "{bad}");
        }
    }

    /// A part of a run over nodes that exits with `EXIT_PEER_LOST` lost a
    /// peer (its node runs it again); a run on one node that exits so
    /// failed, as does any other failure.
    #[test]
    fn a_part_that_lost_a_peer_is_told_from_a_failure() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dirigo-run-end-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, code: u8| {
            let path = dir.join(name);
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\necho before >&2\nprintf '1 event\\r2 events\\r' >&2\necho why >&2\necho '{LIVE_PREFIX}{{\"job\":0,\"rows\":5,\"p99_us\":30,\"slo_us\":20}}' >&2\nexit {code}\n"
                ),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let part = Part {
            addrs: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            me: 1,
            secret_file: "/s".into(),
        };
        let end = |program: &Path, part: Option<&Part>| {
            let mut run = Run::start(program, &job(&[]), 1, part, 1).unwrap();
            loop {
                if let Some(end) = run.try_end() {
                    // Its latency line read, not taken for its last words.
                    let now = std::time::Instant::now();
                    assert_eq!(run.latency_permille(now), Some(1_500));
                    let later = now + LATENCY_FRESH;
                    assert_eq!(run.latency_permille(later), None);
                    return end;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let lost = script("lost", EXIT_PEER_LOST);
        assert_eq!(end(&lost, Some(&part)), RunEnd::PeerLost("why".into()));
        let taken = script("taken", EXIT_PORT_TAKEN);
        assert_eq!(end(&taken, Some(&part)), RunEnd::PortTaken("why".into()));
        let failed = |end: RunEnd| match end {
            RunEnd::Outcome(Outcome::Failed { error }) => error,
            other => panic!("{other:?}"),
        };
        assert!(failed(end(&lost, None)).ends_with("before / why"));
        assert!(failed(end(&taken, None)).ends_with("before / why"));
        assert!(failed(end(&script("failed", 1), Some(&part))).contains("why"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

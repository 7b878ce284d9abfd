//! A node runs each job placed on it as a child process: `dirigo run QUERY
//! FLAGS --json`, the same binary, in the directory the job was submitted
//! from. A child dies with its node (`PR_SET_PDEATHSIG`), so a node killed
//! with SIGKILL leaves no run behind; the node stops a child with SIGKILL
//! when it must no longer run it (its lease lapsed, the job moved or was
//! cancelled) and reaps it before it counts the run as stopped. A run
//! resumes from its data directory's last complete checkpoint, so stopping
//! one anywhere loses nothing committed.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::state::{Job, Outcome};

/// Lines of a child's stderr kept for the error of a failed run, and the
/// bytes kept of each.
const STDERR_TAIL_LINES: usize = 4;
const STDERR_LINE_BYTES: usize = 512;
/// The largest summary kept of a finished run (it goes into the cluster's
/// log; a longer one is left out).
const REPORT_BYTES_MAX: usize = 8 * 1024;

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
    child: Child,
    last_stdout: Arc<Mutex<Option<String>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<JoinHandle<()>>,
}

/// The arguments of the child's `dirigo run`.
pub fn run_args(job: &Job) -> Vec<String> {
    let mut args = vec!["run".to_string(), job.query.clone()];
    args.extend(job.args.iter().cloned());
    if !job.args.iter().any(|a| a == "--json") {
        args.push("--json".into());
    }
    // The run claims the data directory for this placement, and commits
    // nothing once a later one has claimed it.
    args.push(format!("--fence-epoch={}", job.epoch));
    args
}

impl Run {
    /// Start `program run ...` for `job`'s placement `epoch`.
    pub fn start(program: &Path, job: &Job, node: u64) -> Result<Run, String> {
        let mut command = Command::new(program);
        command
            .args(run_args(job))
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
            let name = job.name.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
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
            child,
            last_stdout,
            stderr_tail,
            readers,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The run's outcome once it has ended by itself.
    pub fn try_end(&mut self) -> Option<Outcome> {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(e) => {
                return Some(Outcome::Failed {
                    error: format!("waiting for the run: {e}"),
                })
            }
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        if status.success() {
            let report = self
                .last_stdout
                .lock()
                .unwrap()
                .as_deref()
                .filter(|line| line.len() <= REPORT_BYTES_MAX)
                .and_then(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(serde_json::Value::is_object);
            Some(Outcome::Finished { report })
        } else {
            let tail: Vec<String> = self.stderr_tail.lock().unwrap().iter().cloned().collect();
            Some(Outcome::Failed {
                error: format!("the run exited with {status}: {}", tail.join(" / ")),
            })
        }
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

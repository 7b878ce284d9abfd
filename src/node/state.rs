//! The replicated state of a cluster: its nodes, its jobs and where each job
//! runs. Every node applies the same committed commands in the same order
//! (the consensus log), so every node holds the same state; nothing here
//! reads a clock or does I/O.
//!
//! A job's placement carries an epoch: each `Assign` raises it, and a report
//! of a job's end counts only for the epoch it names, so a node that ran an
//! older placement cannot end (or fail) the current one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most jobs running (or waiting for a node) at once: a submission past
/// it is refused. With [`ENDED_JOBS_KEPT`] and the command's bound, this
/// bounds the state, and so a snapshot of it.
pub const RUNNING_JOBS_MAX: usize = 256;
/// Jobs that ended (finished, failed or cancelled) kept for `status`: the
/// latest submitted ones; older ones are forgotten.
pub const ENDED_JOBS_KEPT: usize = 128;

/// A change to the state, agreed through the consensus log.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Command {
    /// A node's address (a node says it when it starts, and when it moved;
    /// a member says it for a node that asked, `request` nonzero).
    SetAddr {
        node: u64,
        addr: String,
        #[serde(default)]
        request: u64,
    },
    /// A job, as `dirigo run QUERY ARGS` run in `cwd`; `request` names the
    /// request that waits for the answer.
    Submit {
        request: u64,
        query: String,
        args: Vec<String>,
        cwd: String,
    },
    /// The leader places a job on a node, as placement `epoch`.
    Assign {
        job: String,
        node: u64,
        epoch: u64,
    },
    /// The leader moves a running job (placement `epoch`) to node `to`:
    /// its node stops the run first, then says so with `Released`.
    Move {
        job: String,
        epoch: u64,
        to: u64,
    },
    /// The job's node stopped its run of placement `epoch` for a move: the
    /// job's next placement is the move's target.
    Released {
        job: String,
        epoch: u64,
    },
    /// The job's run of placement `epoch` ended.
    Ended {
        job: String,
        epoch: u64,
        outcome: Outcome,
    },
    Cancel {
        request: u64,
        job: String,
    },
    /// The leader declares a node lost (missed heartbeats) or back.
    Liveness {
        node: u64,
        alive: bool,
    },
    /// A client asks that `node` leave the cluster: from now on it holds no
    /// lease; the leader moves its jobs once its last lease has surely
    /// ended, then removes it from the membership.
    Retire {
        request: u64,
        node: u64,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The run finished; its summary (`dirigo run --json`'s last line).
    Finished {
        report: Option<serde_json::Value>,
    },
    Failed {
        error: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Finished,
    Failed,
    Cancelled,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Job {
    pub name: String,
    pub query: String,
    pub args: Vec<String>,
    pub cwd: String,
    /// The node it is placed on, none before its first placement.
    pub node: Option<u64>,
    /// Placements so far: the current one's epoch.
    pub epoch: u64,
    /// A move under way: the node it goes to once its node has released it.
    #[serde(default)]
    pub moving_to: Option<u64>,
    pub state: JobState,
    pub report: Option<serde_json::Value>,
    pub error: Option<String>,
    /// When it ended, as the count of jobs that had ended then (0 while
    /// running): the oldest ended are forgotten first.
    #[serde(default)]
    pub ended_as: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub addr: String,
    pub alive: bool,
    /// Leaving the cluster (`Retire`): it runs nothing, and is removed
    /// from the membership once its jobs moved.
    #[serde(default)]
    pub retired: bool,
}

/// What applying a command answers the request that proposed it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Submitted(String),
    Cancelled(String),
    Moved,
    Retired(u64),
    Refused(String),
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub nodes: BTreeMap<u64, NodeInfo>,
    pub jobs: BTreeMap<String, Job>,
    /// Jobs submitted so far: names are `QUERY-N`.
    pub submitted: u64,
    /// Jobs that ended so far.
    #[serde(default)]
    pub ended: u64,
}

/// The data directory a job's arguments name (`--data-dir D` or
/// `--data-dir=D`).
pub fn data_dir_of(args: &[String]) -> Option<&str> {
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--data-dir" {
            return words.next().map(String::as_str);
        }
        if let Some(dir) = word.strip_prefix("--data-dir=") {
            return Some(dir);
        }
    }
    None
}

impl ClusterState {
    /// A node joined the membership (the consensus layer's change).
    pub fn add_node(&mut self, node: u64, addr: String) {
        self.nodes.insert(
            node,
            NodeInfo {
                addr,
                alive: true,
                retired: false,
            },
        );
    }

    /// A node left the membership (the consensus layer's change).
    pub fn remove_node(&mut self, node: u64) {
        self.nodes.remove(&node);
    }

    /// Apply one committed command; the answer goes to whoever waits on its
    /// request.
    pub fn apply(&mut self, command: Command) -> Option<(u64, Answer)> {
        let ends = matches!(command, Command::Ended { .. } | Command::Cancel { .. });
        let answer = self.apply_one(command);
        if ends {
            // Number what just ended, then keep the latest.
            for job in self.jobs.values_mut() {
                if job.state != JobState::Running && job.ended_as == 0 {
                    self.ended += 1;
                    job.ended_as = self.ended;
                }
            }
            self.forget_old_ended();
        }
        answer
    }

    /// Keep the [`ENDED_JOBS_KEPT`] jobs that ended last.
    fn forget_old_ended(&mut self) {
        let mut ended: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|job| job.state != JobState::Running)
            .map(|job| (job.ended_as, job.name.clone()))
            .collect();
        if ended.len() <= ENDED_JOBS_KEPT {
            return;
        }
        ended.sort_unstable();
        for (_, name) in &ended[..ended.len() - ENDED_JOBS_KEPT] {
            self.jobs.remove(name);
        }
    }

    fn apply_one(&mut self, command: Command) -> Option<(u64, Answer)> {
        match command {
            Command::SetAddr {
                node,
                addr,
                request,
            } => {
                let answer = match self.nodes.get_mut(&node) {
                    Some(info) => {
                        info.addr = addr;
                        Answer::Moved
                    }
                    None => Answer::Refused(format!("node {node} is no member")),
                };
                (request != 0).then_some((request, answer))
            }
            Command::Submit {
                request,
                query,
                args,
                cwd,
            } => {
                let dir = data_dir_of(&args).map(|d| resolve(&cwd, d));
                let clash = self.jobs.values().find(|job| {
                    job.state == JobState::Running
                        && data_dir_of(&job.args).map(|d| resolve(&job.cwd, d)) == dir
                });
                let running = self
                    .jobs
                    .values()
                    .filter(|job| job.state == JobState::Running)
                    .count();
                if running >= RUNNING_JOBS_MAX {
                    return Some((
                        request,
                        Answer::Refused(format!(
                            "the cluster runs {running} jobs, its most; cancel one or wait for one to end"
                        )),
                    ));
                }
                if let Some(other) = clash {
                    return Some((
                        request,
                        Answer::Refused(format!(
                            "job {} keeps its checkpoints in the same data directory; give \
                             each job its own --data-dir",
                            other.name
                        )),
                    ));
                }
                self.submitted += 1;
                let name = format!("{query}-{}", self.submitted);
                self.jobs.insert(
                    name.clone(),
                    Job {
                        name: name.clone(),
                        query,
                        args,
                        cwd,
                        node: None,
                        epoch: 0,
                        moving_to: None,
                        state: JobState::Running,
                        report: None,
                        error: None,
                        ended_as: 0,
                    },
                );
                Some((request, Answer::Submitted(name)))
            }
            Command::Assign { job, node, epoch } => {
                if let Some(job) = self.jobs.get_mut(&job) {
                    if job.state == JobState::Running && epoch == job.epoch + 1 {
                        job.node = Some(node);
                        job.epoch = epoch;
                        job.moving_to = None;
                    }
                }
                None
            }
            Command::Move { job, epoch, to } => {
                let target_alive = self.nodes.get(&to).is_some_and(|n| n.alive && !n.retired);
                // One move at a time, whoever proposed it.
                let moving = self
                    .jobs
                    .values()
                    .any(|j| j.state == JobState::Running && j.moving_to.is_some());
                if moving {
                    return None;
                }
                if let Some(job) = self.jobs.get_mut(&job) {
                    if job.state == JobState::Running
                        && job.epoch == epoch
                        && job.moving_to.is_none()
                        && job.node.is_some_and(|n| n != to)
                        && target_alive
                    {
                        job.moving_to = Some(to);
                    }
                }
                None
            }
            Command::Released { job, epoch } => {
                if let Some(job) = self.jobs.get_mut(&job) {
                    if job.state == JobState::Running && job.epoch == epoch {
                        if let Some(to) = job.moving_to.take() {
                            job.node = Some(to);
                            job.epoch += 1;
                        }
                    }
                }
                None
            }
            Command::Ended {
                job,
                epoch,
                outcome,
            } => {
                if let Some(job) = self.jobs.get_mut(&job) {
                    if job.state == JobState::Running && epoch == job.epoch {
                        match outcome {
                            Outcome::Finished { report } => {
                                job.state = JobState::Finished;
                                job.report = report;
                            }
                            Outcome::Failed { error } => {
                                job.state = JobState::Failed;
                                job.error = Some(error);
                            }
                        }
                    }
                }
                None
            }
            Command::Cancel { request, job } => {
                let answer = match self.jobs.get_mut(&job) {
                    None => Answer::Refused(format!("no job is named {job}")),
                    Some(j) if j.state != JobState::Running => {
                        Answer::Refused(format!("job {job} is {} already", state_name(j.state)))
                    }
                    Some(j) => {
                        j.state = JobState::Cancelled;
                        Answer::Cancelled(job)
                    }
                };
                Some((request, answer))
            }
            Command::Liveness { node, alive } => {
                if let Some(info) = self.nodes.get_mut(&node) {
                    // A node leaving is never back.
                    info.alive = alive && !info.retired;
                }
                None
            }
            Command::Retire { request, node } => {
                let staying = self.nodes.values().filter(|n| !n.retired).count();
                let answer = match self.nodes.get_mut(&node) {
                    None => Answer::Refused(format!("node {node} is no member")),
                    Some(info) if info.retired => {
                        Answer::Refused(format!("node {node} is leaving already"))
                    }
                    Some(_) if staying <= 1 => Answer::Refused(format!(
                        "node {node} is the last member staying; it cannot leave"
                    )),
                    Some(info) => {
                        info.retired = true;
                        Answer::Retired(node)
                    }
                };
                Some((request, answer))
            }
        }
    }

    /// Running jobs with no live node: the leader places them (again).
    pub fn unplaced(&self) -> Vec<(String, u64)> {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .filter(|j| match j.node {
                None => true,
                Some(n) => !self.nodes.get(&n).is_some_and(|info| info.alive),
            })
            .map(|j| (j.name.clone(), j.epoch))
            .collect()
    }
}

/// The number of a job's name (`q5-12`: 12), its order of submission.
pub fn submission_number(name: &str) -> u64 {
    name.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Finished => "finished",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// `path` from `cwd`, with `.` and `..` taken out (lexically: a symbolic
/// link is not followed, so two paths through different links to one
/// directory still differ).
fn resolve(cwd: &str, path: &str) -> std::path::PathBuf {
    use std::path::Component;
    let mut resolved = std::path::PathBuf::new();
    for component in std::path::Path::new(cwd).join(path).components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            other => resolved.push(other),
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(state: &mut ClusterState, request: u64, dir: &str) -> Answer {
        state
            .apply(Command::Submit {
                request,
                query: "q5".into(),
                args: vec!["--data-dir".into(), dir.into()],
                cwd: "/tmp".into(),
            })
            .map(|(r, a)| {
                assert_eq!(r, request);
                a
            })
            .expect("a submit is answered")
    }

    #[test]
    fn jobs_are_named_and_a_shared_data_directory_is_refused() {
        let mut state = ClusterState::default();
        assert_eq!(submit(&mut state, 1, "a"), Answer::Submitted("q5-1".into()));
        assert_eq!(
            submit(&mut state, 2, "/tmp/a"),
            Answer::Refused(
                "job q5-1 keeps its checkpoints in the same data directory; give each job its \
                 own --data-dir"
                    .into()
            )
        );
        // The same directory through `..` and `.`.
        assert!(matches!(
            submit(&mut state, 3, "/tmp/x/.././a/"),
            Answer::Refused(_)
        ));
        assert_eq!(submit(&mut state, 4, "b"), Answer::Submitted("q5-2".into()));
    }

    #[test]
    fn placements_are_epoch_checked_and_a_lost_node_unplaces_its_jobs() {
        let mut state = ClusterState::default();
        state.add_node(1, "a:1".into());
        state.add_node(2, "a:2".into());
        submit(&mut state, 1, "a");
        submit(&mut state, 2, "b");
        assert_eq!(state.unplaced().len(), 2);
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 1,
            epoch: 1,
        });
        assert_eq!(state.unplaced(), vec![("q5-2".to_string(), 0)]);
        // A second Assign of the same epoch (a repeated proposal) is ignored.
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 2,
            epoch: 1,
        });
        assert_eq!(state.jobs["q5-1"].node, Some(1));
        // Node 1 is lost: its job is unplaced again.
        state.apply(Command::Liveness {
            node: 1,
            alive: false,
        });
        assert_eq!(
            state.unplaced(),
            vec![("q5-1".to_string(), 1), ("q5-2".to_string(), 0)]
        );
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 2,
            epoch: 2,
        });
        // The old placement's end does not end the new one.
        state.apply(Command::Ended {
            job: "q5-1".into(),
            epoch: 1,
            outcome: Outcome::Failed {
                error: "killed".into(),
            },
        });
        assert_eq!(state.jobs["q5-1"].state, JobState::Running);
        state.apply(Command::Ended {
            job: "q5-1".into(),
            epoch: 2,
            outcome: Outcome::Finished { report: None },
        });
        assert_eq!(state.jobs["q5-1"].state, JobState::Finished);
    }

    #[test]
    fn a_move_takes_effect_only_once_released_and_for_its_epoch() {
        let mut state = ClusterState::default();
        state.add_node(1, "a:1".into());
        state.add_node(2, "a:2".into());
        submit(&mut state, 1, "a");
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 1,
            epoch: 1,
        });
        // A move of a stale placement does nothing.
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 0,
            to: 2,
        });
        assert_eq!(state.jobs["q5-1"].moving_to, None);
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 1,
            to: 2,
        });
        // Still on node 1 until it releases it.
        assert_eq!(state.jobs["q5-1"].node, Some(1));
        assert_eq!(state.jobs["q5-1"].moving_to, Some(2));
        // A second move while one is under way does nothing, of this job
        // or another.
        state.add_node(3, "a:3".into());
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 1,
            to: 3,
        });
        assert_eq!(state.jobs["q5-1"].moving_to, Some(2));
        submit(&mut state, 2, "b");
        state.apply(Command::Assign {
            job: "q5-2".into(),
            node: 1,
            epoch: 1,
        });
        state.apply(Command::Move {
            job: "q5-2".into(),
            epoch: 1,
            to: 3,
        });
        assert_eq!(state.jobs["q5-2"].moving_to, None);
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
        });
        let job = &state.jobs["q5-1"];
        assert_eq!((job.node, job.epoch, job.moving_to), (Some(2), 2, None));
        // A repeated release (of the old epoch) does nothing.
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
        });
        assert_eq!(state.jobs["q5-1"].epoch, 2);
        // A move to a lost node does nothing.
        state.apply(Command::Liveness {
            node: 1,
            alive: false,
        });
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 2,
            to: 1,
        });
        assert_eq!(state.jobs["q5-1"].moving_to, None);
    }

    #[test]
    fn cancel_answers_what_it_did() {
        let mut state = ClusterState::default();
        submit(&mut state, 1, "a");
        let cancel = |state: &mut ClusterState, job: &str| {
            state
                .apply(Command::Cancel {
                    request: 9,
                    job: job.into(),
                })
                .unwrap()
                .1
        };
        assert_eq!(cancel(&mut state, "q5-1"), Answer::Cancelled("q5-1".into()));
        assert_eq!(
            cancel(&mut state, "q5-1"),
            Answer::Refused("job q5-1 is cancelled already".into())
        );
        assert_eq!(
            cancel(&mut state, "q9-1"),
            Answer::Refused("no job is named q9-1".into())
        );
    }

    /// The state is bounded: a submission past `RUNNING_JOBS_MAX` running
    /// jobs is refused, and only the latest `ENDED_JOBS_KEPT` ended jobs
    /// are kept.
    #[test]
    fn running_jobs_are_capped_and_old_ended_ones_forgotten() {
        let mut state = ClusterState::default();
        for i in 0..RUNNING_JOBS_MAX as u64 {
            assert!(matches!(
                submit(&mut state, i, &format!("d{i}")),
                Answer::Submitted(_)
            ));
        }
        let refused = submit(&mut state, 999, "over");
        assert!(
            matches!(&refused, Answer::Refused(why) if why.contains("its most")),
            "{refused:?}"
        );
        // Every job ends; the oldest are forgotten, the latest kept.
        for i in 1..=RUNNING_JOBS_MAX {
            state.apply(Command::Cancel {
                request: 0,
                job: format!("q5-{i}"),
            });
        }
        assert_eq!(state.jobs.len(), ENDED_JOBS_KEPT);
        let oldest_kept = RUNNING_JOBS_MAX - ENDED_JOBS_KEPT + 1;
        assert!(state.jobs.contains_key(&format!("q5-{oldest_kept}")));
        assert!(!state.jobs.contains_key(&format!("q5-{}", oldest_kept - 1)));
        // Room again: names go on from the count.
        assert_eq!(
            submit(&mut state, 1000, "again"),
            Answer::Submitted(format!("q5-{}", RUNNING_JOBS_MAX + 1))
        );
        // What ended last is kept, however early it was submitted: a job
        // that ran long next to many short ones.
        let mut state = ClusterState::default();
        for i in 0..=ENDED_JOBS_KEPT as u64 {
            submit(&mut state, i, &format!("d{i}"));
        }
        for i in 2..=ENDED_JOBS_KEPT + 1 {
            state.apply(Command::Cancel {
                request: 0,
                job: format!("q5-{i}"),
            });
        }
        state.apply(Command::Cancel {
            request: 0,
            job: "q5-1".into(),
        });
        assert_eq!(state.jobs.len(), ENDED_JOBS_KEPT);
        assert_eq!(state.jobs["q5-1"].state, JobState::Cancelled);
        assert!(!state.jobs.contains_key("q5-2"));
    }

    /// A member's new address is answered when asked for, refused for a
    /// stranger, and silent when the node says it itself (request 0).
    #[test]
    fn an_address_is_set_for_members_only() {
        let mut state = ClusterState::default();
        state.add_node(7, "127.0.0.1:1".into());
        let set = |state: &mut ClusterState, node: u64, request: u64| {
            state.apply(Command::SetAddr {
                node,
                addr: "127.0.0.1:2".into(),
                request,
            })
        };
        assert_eq!(set(&mut state, 7, 5), Some((5, Answer::Moved)));
        assert_eq!(state.nodes[&7].addr, "127.0.0.1:2");
        assert_eq!(
            set(&mut state, 8, 6),
            Some((6, Answer::Refused("node 8 is no member".into())))
        );
        assert!(!state.nodes.contains_key(&8));
        assert_eq!(set(&mut state, 7, 0), None);
    }

    /// A node leaves only if it is a member, not leaving already, and not
    /// the last staying; once leaving it is never declared alive again.
    #[test]
    fn a_node_retires_once_and_never_the_last() {
        let mut state = ClusterState::default();
        state.add_node(1, "a".into());
        state.add_node(2, "b".into());
        let retire = |state: &mut ClusterState, node: u64| {
            state.apply(Command::Retire { request: 3, node }).unwrap().1
        };
        assert_eq!(
            retire(&mut state, 9),
            Answer::Refused("node 9 is no member".into())
        );
        assert_eq!(retire(&mut state, 2), Answer::Retired(2));
        assert!(state.nodes[&2].retired);
        assert_eq!(
            retire(&mut state, 2),
            Answer::Refused("node 2 is leaving already".into())
        );
        assert_eq!(
            retire(&mut state, 1),
            Answer::Refused("node 1 is the last member staying; it cannot leave".into())
        );
        state.apply(Command::Liveness {
            node: 2,
            alive: false,
        });
        state.apply(Command::Liveness {
            node: 2,
            alive: true,
        });
        assert!(!state.nodes[&2].alive);
        state.remove_node(2);
        assert!(!state.nodes.contains_key(&2));
    }
}

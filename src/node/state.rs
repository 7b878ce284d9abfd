//! The replicated state of a cluster: its nodes, its jobs and where each job
//! runs. Every node applies the same committed commands in the same order
//! (the consensus log), so every node holds the same state; nothing here
//! reads a clock or does I/O.
//!
//! A job's placement carries an epoch: each placement (an `Assign`, or a
//! move taking effect) raises it, and a report
//! of a job's end counts only for the epoch it names, so a node that ran an
//! older placement cannot end (or fail) the current one.
//!
//! A placement is one node, or several: the job then runs as one `dirigo
//! run --nodes` over them, part 0 (`Job::node`, which takes the job's
//! checkpoints and writes its output) and the others (`Job::peers`), each
//! part listening on its placement's port. A placement with a live node in
//! it changes only by a move: every live node of it stops its part and says
//! so (`Released`) before the next placement takes effect, so no two
//! placements' parts ever run at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most jobs running (or waiting for a node) at once: a submission past
/// it is refused. With [`ENDED_JOBS_KEPT`], the command's bound and the
/// part summaries' ([`PART_REPORT_BYTES_MAX`], [`PART_REPORTS_MAX`]),
/// this bounds the state, and so a snapshot of it.
pub const RUNNING_JOBS_MAX: usize = 256;
/// Times in a row a job runs again on the same nodes because a part lost
/// a peer soon after it started (or could not listen) before its nodes
/// fail it (a peer that can never connect, ports all taken).
pub const RESTARTS_MAX: u32 = 5;
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
    /// The leader places a job on `node`, and `peers` for a run over
    /// nodes, as placement `epoch`: a job with no placement, or none of
    /// whose nodes is alive.
    Assign {
        job: String,
        node: u64,
        epoch: u64,
        #[serde(default)]
        peers: Vec<u64>,
        /// Each part's port, for a run over nodes (empty for one node).
        #[serde(default)]
        ports: Vec<u16>,
    },
    /// A running job (placement `epoch`) moves to node `to` and `peers`:
    /// each live node of its placement stops its part first, then says so
    /// with `Released`. The leader moves jobs to rebalance, and off a lost
    /// node; a node moves its job to the same placement to run it again
    /// when its part lost a peer (or to the same nodes on other ports when
    /// its part could not listen).
    Move {
        job: String,
        epoch: u64,
        to: u64,
        #[serde(default)]
        peers: Vec<u64>,
        #[serde(default)]
        ports: Vec<u16>,
        /// A move to the same nodes because a part lost a peer soon after
        /// it started, or could not listen: it counts toward
        /// `RESTARTS_MAX`.
        #[serde(default)]
        quick: bool,
        /// The placement is narrower than the job could have, by the
        /// leader's choice (it fits there): it is widened again only when
        /// a node of it is saturated (`Job::narrowed`).
        #[serde(default)]
        narrowed: bool,
    },
    /// `node` stopped its part of placement `epoch` for a move: once every
    /// live node of the placement has, the move's target is the job's next
    /// placement. (Node 0: the job's `node`, as logs of older builds say.)
    Released {
        job: String,
        epoch: u64,
        #[serde(default)]
        node: u64,
    },
    /// The job's run of placement `epoch` ended.
    Ended {
        job: String,
        epoch: u64,
        outcome: Outcome,
    },
    /// A part other than 0 of the run over nodes of placement `epoch`
    /// finished on `node`, with its summary (part 0's comes with `Ended`):
    /// kept for `status` to add to the job's figures.
    PartEnded {
        job: String,
        epoch: u64,
        node: u64,
        report: serde_json::Value,
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
    /// The node it is placed on (part 0 of a run over nodes), none before
    /// its first placement.
    pub node: Option<u64>,
    /// The other nodes of a run over nodes: part `i + 1` is `peers[i]`.
    #[serde(default)]
    pub peers: Vec<u64>,
    /// Each part's port for a run over nodes, in part order (empty for a
    /// run on one node).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Placements so far: the current one's epoch.
    pub epoch: u64,
    /// A move under way: where part 0 goes once the placement's live nodes
    /// have released it, and the other parts.
    #[serde(default)]
    pub moving_to: Option<u64>,
    #[serde(default)]
    pub moving_peers: Vec<u64>,
    #[serde(default)]
    pub moving_ports: Vec<u16>,
    /// Nodes of the placement that released it for the move under way.
    #[serde(default)]
    pub released: Vec<u64>,
    /// Moves in a row to the same nodes because a part lost a peer soon
    /// after it started, or could not listen (`Move::quick`): its nodes
    /// give up past `RESTARTS_MAX`. A move to other nodes, or one after a
    /// part ran a while, starts the count again.
    #[serde(default)]
    pub restarts: u32,
    /// Placed on fewer nodes than it could run on because it fits there
    /// (the last `Move` said so; an `Assign` places it anew): the leader
    /// widens it only when a node of its placement is saturated.
    #[serde(default)]
    pub narrowed: bool,
    pub state: JobState,
    pub report: Option<serde_json::Value>,
    /// The summaries of the parts other than 0 of the current placement
    /// that finished, by node (`PartEnded`; none for a run on one node).
    #[serde(default)]
    pub part_reports: BTreeMap<u64, serde_json::Value>,
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

/// The largest part summary kept (`PartEnded`; its node sends only the
/// figures `status` adds up, a few hundred bytes), and the most kept for
/// one job: with [`RUNNING_JOBS_MAX`] and [`ENDED_JOBS_KEPT`], at most
/// 3 MiB of the state.
pub const PART_REPORT_BYTES_MAX: usize = 512;
pub const PART_REPORTS_MAX: usize = 16;

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

impl Job {
    /// The nodes of its placement, part 0 first (none before the first).
    pub fn placement(&self) -> Vec<u64> {
        self.node
            .into_iter()
            .chain(self.peers.iter().copied())
            .collect()
    }

    /// Whether `node` runs a part of its placement.
    pub fn runs_on(&self, node: u64) -> bool {
        self.node == Some(node) || self.peers.contains(&node)
    }

    /// Its shards over all the nodes it runs on (`--cores`; 1 if none).
    pub fn shards(&self) -> u64 {
        cores_of(&self.args).unwrap_or(1).max(1)
    }
}

/// The shard count a job's arguments name (`--cores N` or `--cores=N`).
pub fn cores_of(args: &[String]) -> Option<u64> {
    flag_of(args, "--cores")?.parse().ok()
}

/// The value of the first `FLAG V` or `FLAG=V` in `args`.
fn flag_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == flag {
            return words.next().map(String::as_str);
        }
        if let Some(value) = word.strip_prefix(flag).and_then(|w| w.strip_prefix('=')) {
            return Some(value);
        }
    }
    None
}

/// The most nodes a job of `shards` shards runs on with `live` nodes: the
/// largest count that divides its shards evenly (every part runs as many).
pub fn width(shards: u64, live: usize) -> usize {
    let most = (live as u64).min(shards).max(1);
    (1..=most)
        .rev()
        .find(|k| shards.is_multiple_of(*k))
        .unwrap_or(1) as usize
}

/// Whether `node`, `peers` and `ports` make a placement: distinct nodes,
/// and a port per part when there is more than one.
fn well_formed(node: u64, peers: &[u64], ports: &[u16]) -> bool {
    let mut nodes: Vec<u64> = std::iter::once(node).chain(peers.iter().copied()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes.len() == peers.len() + 1
        && if peers.is_empty() {
            ports.is_empty()
        } else {
            ports.len() == peers.len() + 1
        }
}

/// The data directory a job's arguments name (`--data-dir D` or
/// `--data-dir=D`).
pub fn data_dir_of(args: &[String]) -> Option<&str> {
    flag_of(args, "--data-dir")
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
                        peers: Vec::new(),
                        ports: Vec::new(),
                        epoch: 0,
                        moving_to: None,
                        moving_peers: Vec::new(),
                        moving_ports: Vec::new(),
                        released: Vec::new(),
                        restarts: 0,
                        narrowed: false,
                        state: JobState::Running,
                        report: None,
                        part_reports: BTreeMap::new(),
                        error: None,
                        ended_as: 0,
                    },
                );
                Some((request, Answer::Submitted(name)))
            }
            Command::Assign {
                job,
                node,
                epoch,
                peers,
                ports,
            } => {
                // Only where no live node runs a part of it.
                let live = self
                    .jobs
                    .get(&job)
                    .is_some_and(|j| j.placement().iter().any(|n| self.is_alive(*n)));
                let taken = self.ports_taken(&job, &ports);
                if let Some(job) = self.jobs.get_mut(&job) {
                    if job.state == JobState::Running
                        && epoch == job.epoch + 1
                        && !live
                        && !taken
                        && well_formed(node, &peers, &ports)
                    {
                        job.node = Some(node);
                        job.peers = peers;
                        job.ports = ports;
                        job.restarts = 0;
                        job.narrowed = false;
                        job.epoch = epoch;
                        job.moving_to = None;
                        job.moving_peers.clear();
                        job.moving_ports.clear();
                        job.released.clear();
                        job.part_reports.clear();
                    }
                }
                None
            }
            Command::Move {
                job,
                epoch,
                to,
                peers,
                ports,
                quick,
                narrowed,
            } => {
                let targets_alive = std::iter::once(to)
                    .chain(peers.iter().copied())
                    .all(|n| self.nodes.get(&n).is_some_and(|n| n.alive && !n.retired));
                let current = self.jobs.get(&job)?;
                // A job whose nodes all live moves only while no other
                // does (a rebalance, whoever proposed it); one off a lost
                // node moves at once.
                let whole = current.placement().iter().all(|n| self.is_alive(*n));
                let moving = self
                    .jobs
                    .values()
                    .any(|j| j.state == JobState::Running && j.moving_to.is_some());
                if whole && moving {
                    return None;
                }
                if current.state == JobState::Running
                    && current.epoch == epoch
                    && current.moving_to.is_none()
                    && current.node.is_some()
                    && targets_alive
                    && well_formed(to, &peers, &ports)
                    && !self.ports_taken(&job, &ports)
                {
                    let job = self.jobs.get_mut(&job).expect("looked up above");
                    // On the same nodes (on other ports if a part could not
                    // listen).
                    let again = job.node == Some(to) && job.peers == peers;
                    job.restarts = match (again, quick) {
                        (true, true) => job.restarts + 1,
                        _ => 0,
                    };
                    job.narrowed = narrowed;
                    job.moving_to = Some(to);
                    job.moving_peers = peers;
                    job.moving_ports = ports;
                    job.released.clear();
                    let name = job.name.clone();
                    self.complete_move(&name);
                }
                None
            }
            Command::Released { job, epoch, node } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    let node = if node == 0 { j.node.unwrap_or(0) } else { node };
                    if j.state == JobState::Running
                        && j.epoch == epoch
                        && j.moving_to.is_some()
                        && j.runs_on(node)
                        && !j.released.contains(&node)
                    {
                        j.released.push(node);
                        self.complete_move(&job);
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
            Command::PartEnded {
                job,
                epoch,
                node,
                report,
            } => {
                if let Some(job) = self.jobs.get_mut(&job) {
                    let ended_or_running =
                        matches!(job.state, JobState::Running | JobState::Finished);
                    if ended_or_running
                        && epoch == job.epoch
                        && job.peers.contains(&node)
                        && report.is_object()
                        && report.to_string().len() <= PART_REPORT_BYTES_MAX
                        && (job.part_reports.len() < PART_REPORTS_MAX
                            || job.part_reports.contains_key(&node))
                    {
                        job.part_reports.insert(node, report);
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
                // A lost node releases nothing: the moves it held up go on.
                let moving: Vec<String> = self
                    .jobs
                    .values()
                    .filter(|j| j.state == JobState::Running && j.moving_to.is_some())
                    .map(|j| j.name.clone())
                    .collect();
                for job in moving {
                    self.complete_move(&job);
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

    /// Whether another running job's placement (or move under way) holds
    /// one of `ports`: two proposers may choose the same (the leader and a
    /// node running a job again); the later proposal is refused, and made
    /// again on what the state then holds.
    fn ports_taken(&self, job: &str, ports: &[u16]) -> bool {
        self.jobs
            .values()
            .filter(|j| j.name != job && j.state == JobState::Running)
            .flat_map(|j| j.ports.iter().chain(&j.moving_ports))
            .any(|p| ports.contains(p))
    }

    /// Whether `node` is a member and not declared lost.
    pub fn is_alive(&self, node: u64) -> bool {
        self.nodes.get(&node).is_some_and(|info| info.alive)
    }

    /// The move under way of `job` takes effect once every node of its
    /// placement released it or is lost (a lost node's lease has ended, and
    /// its part with it).
    fn complete_move(&mut self, job: &str) {
        let Some(j) = self.jobs.get(job) else {
            return;
        };
        let done = j.moving_to.is_some()
            && j.placement()
                .iter()
                .all(|n| j.released.contains(n) || !self.is_alive(*n));
        if !done {
            return;
        }
        let j = self.jobs.get_mut(job).expect("looked up above");
        j.node = j.moving_to.take();
        j.peers = std::mem::take(&mut j.moving_peers);
        j.ports = std::mem::take(&mut j.moving_ports);
        j.released.clear();
        j.part_reports.clear();
        j.epoch += 1;
    }

    /// Running jobs, not moving, with no placement or a lost node in it:
    /// the leader places them (again), with whether none of their nodes
    /// lives (an `Assign`; otherwise a `Move`, which the live ones release).
    pub fn unplaced(&self) -> Vec<(String, u64, bool)> {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Running && j.moving_to.is_none())
            .filter(|j| j.node.is_none() || j.placement().iter().any(|n| !self.is_alive(*n)))
            .map(|j| {
                let none_alive = !j.placement().iter().any(|n| self.is_alive(*n));
                (j.name.clone(), j.epoch, none_alive)
            })
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
            peers: vec![],
            ports: vec![],
        });
        assert_eq!(state.unplaced(), vec![("q5-2".to_string(), 0, true)]);
        // A second Assign of the same epoch (a repeated proposal) is ignored.
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 2,
            epoch: 1,
            peers: vec![],
            ports: vec![],
        });
        assert_eq!(state.jobs["q5-1"].node, Some(1));
        // Node 1 is lost: its job is unplaced again.
        state.apply(Command::Liveness {
            node: 1,
            alive: false,
        });
        assert_eq!(
            state.unplaced(),
            vec![("q5-1".to_string(), 1, true), ("q5-2".to_string(), 0, true)]
        );
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 2,
            epoch: 2,
            peers: vec![],
            ports: vec![],
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
            peers: vec![],
            ports: vec![],
        });
        // A move of a stale placement does nothing.
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 0,
            to: 2,
            peers: vec![],
            ports: vec![],
            quick: false,
            narrowed: false,
        });
        assert_eq!(state.jobs["q5-1"].moving_to, None);
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 1,
            to: 2,
            peers: vec![],
            ports: vec![],
            quick: false,
            narrowed: false,
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
            peers: vec![],
            ports: vec![],
            quick: false,
            narrowed: false,
        });
        assert_eq!(state.jobs["q5-1"].moving_to, Some(2));
        submit(&mut state, 2, "b");
        state.apply(Command::Assign {
            job: "q5-2".into(),
            node: 1,
            epoch: 1,
            peers: vec![],
            ports: vec![],
        });
        state.apply(Command::Move {
            job: "q5-2".into(),
            epoch: 1,
            to: 3,
            peers: vec![],
            ports: vec![],
            quick: false,
            narrowed: false,
        });
        assert_eq!(state.jobs["q5-2"].moving_to, None);
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
            node: 0,
        });
        let job = &state.jobs["q5-1"];
        assert_eq!((job.node, job.epoch, job.moving_to), (Some(2), 2, None));
        // A repeated release (of the old epoch) does nothing.
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
            node: 0,
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
            peers: vec![],
            ports: vec![],
            quick: false,
            narrowed: false,
        });
        assert_eq!(state.jobs["q5-1"].moving_to, None);
    }

    /// A job over several nodes: placed whole, moved only once every live
    /// node of it released it (a lost one counts as released), and never
    /// assigned anew while a node of it lives.
    #[test]
    fn a_placement_over_nodes_moves_once_each_live_node_released_it() {
        let mut state = ClusterState::default();
        for n in 1..=3 {
            state.add_node(n, format!("127.0.0.1:{n}"));
        }
        submit(&mut state, 1, "a");
        // Malformed placements are refused: a node twice, a port missing.
        for (peers, ports) in [(vec![1], vec![7, 8]), (vec![2], vec![7])] {
            state.apply(Command::Assign {
                job: "q5-1".into(),
                node: 1,
                epoch: 1,
                peers,
                ports,
            });
            assert_eq!(state.jobs["q5-1"].node, None);
        }
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 1,
            epoch: 1,
            peers: vec![2],
            ports: vec![7, 8],
        });
        let job = &state.jobs["q5-1"];
        assert_eq!(job.placement(), vec![1, 2]);
        assert!(job.runs_on(2) && !job.runs_on(3));
        assert_eq!(state.unplaced(), vec![]);
        // Node 2 is lost: the job needs a placement, by a move (node 1
        // lives), and an Assign is refused.
        state.apply(Command::Liveness {
            node: 2,
            alive: false,
        });
        assert_eq!(state.unplaced(), vec![("q5-1".to_string(), 1, false)]);
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 3,
            epoch: 2,
            peers: vec![],
            ports: vec![],
        });
        assert_eq!(state.jobs["q5-1"].epoch, 1);
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 1,
            to: 3,
            peers: vec![1],
            ports: vec![9, 10],
            quick: false,
            narrowed: false,
        });
        // Node 1 runs its part until it releases it; node 2's release is
        // not awaited.
        let job = &state.jobs["q5-1"];
        assert_eq!((job.epoch, job.moving_to), (1, Some(3)));
        assert!(state.unplaced().is_empty());
        // A release by a node not in the placement does nothing.
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
            node: 3,
        });
        assert_eq!(state.jobs["q5-1"].epoch, 1);
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
            node: 1,
        });
        let job = &state.jobs["q5-1"];
        assert_eq!(
            (job.node, job.peers.clone(), job.ports.clone(), job.epoch),
            (Some(3), vec![1], vec![9, 10], 2)
        );
        assert_eq!(job.moving_to, None);
        assert!(job.released.is_empty());
        // A move to the same placement (a part lost a peer) runs it again
        // as the next epoch; here node 3 is lost before releasing.
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 2,
            to: 3,
            peers: vec![1],
            ports: vec![9, 10],
            quick: true,
            narrowed: false,
        });
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 2,
            node: 1,
        });
        assert_eq!(state.jobs["q5-1"].epoch, 2);
        state.apply(Command::Liveness {
            node: 3,
            alive: false,
        });
        assert_eq!(state.jobs["q5-1"].epoch, 3);
        assert_eq!(state.jobs["q5-1"].restarts, 1);
        // Now on a lost node again: placed anew.
        assert_eq!(state.unplaced(), vec![("q5-1".to_string(), 3, false)]);
        // Moved elsewhere: the count starts again.
        state.apply(Command::Liveness {
            node: 2,
            alive: true,
        });
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 3,
            to: 2,
            peers: vec![1],
            ports: vec![9, 10],
            quick: false,
            narrowed: false,
        });
        assert_eq!(state.jobs["q5-1"].restarts, 0);
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 3,
            node: 1,
        });
        assert_eq!(state.jobs["q5-1"].placement(), vec![2, 1]);
        assert_eq!(state.jobs["q5-1"].epoch, 4);
    }

    /// A placement whose ports another running job holds is refused.
    #[test]
    fn ports_another_job_holds_are_refused() {
        let mut state = ClusterState::default();
        for n in 1..=2 {
            state.add_node(n, format!("127.0.0.1:{n}"));
        }
        submit(&mut state, 1, "a");
        submit(&mut state, 2, "b");
        let assign = |state: &mut ClusterState, job: &str, ports: Vec<u16>| {
            state.apply(Command::Assign {
                job: job.into(),
                node: 1,
                epoch: 1,
                peers: vec![2],
                ports,
            });
        };
        assign(&mut state, "q5-1", vec![7, 8]);
        assign(&mut state, "q5-2", vec![8, 9]);
        assert_eq!(state.jobs["q5-2"].node, None);
        assign(&mut state, "q5-2", vec![9, 10]);
        assert_eq!(state.jobs["q5-2"].ports, vec![9, 10]);
        // A move onto another's ports is refused; onto its own, taken.
        let to = |state: &mut ClusterState, ports: Vec<u16>| {
            state.apply(Command::Move {
                job: "q5-1".into(),
                epoch: 1,
                to: 1,
                peers: vec![2],
                ports,
                quick: true,
                narrowed: false,
            });
            state.jobs["q5-1"].moving_ports.clone()
        };
        assert!(to(&mut state, vec![10, 11]).is_empty());
        assert_eq!(to(&mut state, vec![8, 11]), vec![8, 11]);
    }

    #[test]
    fn a_job_runs_on_as_many_nodes_as_divide_its_shards() {
        assert_eq!(width(1, 3), 1);
        assert_eq!(width(2, 3), 2);
        assert_eq!(width(3, 2), 1);
        assert_eq!(width(4, 3), 2);
        assert_eq!(width(6, 3), 3);
        assert_eq!(width(6, 5), 3);
        assert_eq!(width(8, 0), 1);
        let job = |args: &[&str]| Job {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..serde_json::from_value(serde_json::json!({
                "name": "q5-1", "query": "q5", "args": [], "cwd": "/", "node": null,
                "epoch": 0, "state": "running", "report": null, "error": null
            }))
            .unwrap()
        };
        assert_eq!(job(&["--cores", "4"]).shards(), 4);
        assert_eq!(job(&["--rate=5", "--cores=6"]).shards(), 6);
        assert_eq!(job(&[]).shards(), 1);
        assert_eq!(job(&["--cores=0"]).shards(), 1);
    }

    /// A part's summary is kept for a peer of the current placement, while
    /// the job runs or after it finished, and dropped with the placement.
    #[test]
    fn a_part_summary_is_kept_for_its_placement_only() {
        let mut state = ClusterState::default();
        for n in 1..=3 {
            state.add_node(n, format!("a:{n}"));
        }
        submit(&mut state, 1, "a");
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 1,
            epoch: 1,
            peers: vec![2],
            ports: vec![7700, 7701],
        });
        let summary = serde_json::json!({"events": 5});
        let part = |epoch, node, report: &serde_json::Value| Command::PartEnded {
            job: "q5-1".into(),
            epoch,
            node,
            report: report.clone(),
        };
        // Not a peer (part 0's node, another node), another epoch, not an
        // object: nothing kept.
        state.apply(part(1, 1, &summary));
        state.apply(part(1, 3, &summary));
        state.apply(part(2, 2, &summary));
        state.apply(part(1, 2, &serde_json::json!(5)));
        let long = serde_json::json!({ "x": "y".repeat(PART_REPORT_BYTES_MAX) });
        state.apply(part(1, 2, &long));
        assert!(state.jobs["q5-1"].part_reports.is_empty());
        state.apply(part(1, 2, &summary));
        assert_eq!(state.jobs["q5-1"].part_reports[&2], summary);
        // After the job finished too.
        state.apply(Command::Ended {
            job: "q5-1".into(),
            epoch: 1,
            outcome: Outcome::Finished { report: None },
        });
        let later = serde_json::json!({"events": 7});
        state.apply(part(1, 2, &later));
        assert_eq!(state.jobs["q5-1"].part_reports[&2], later);
        // A new placement drops them.
        submit(&mut state, 2, "b");
        state.apply(Command::Assign {
            job: "q5-2".into(),
            node: 1,
            epoch: 1,
            peers: vec![2],
            ports: vec![7702, 7703],
        });
        state.apply(part(1, 2, &summary));
        state.apply(Command::Move {
            job: "q5-2".into(),
            epoch: 1,
            to: 2,
            peers: vec![3],
            ports: vec![7704, 7705],
            quick: false,
            narrowed: false,
        });
        for node in [1, 2] {
            state.apply(Command::Released {
                job: "q5-2".into(),
                epoch: 1,
                node,
            });
        }
        assert_eq!(state.jobs["q5-2"].epoch, 2);
        assert!(state.jobs["q5-2"].part_reports.is_empty());
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

//! `dirigo node`: one member of a cluster. It agrees with the others, by
//! Raft (the `raft` crate, driven here), on the cluster's state
//! ([`state::ClusterState`]: members, jobs, each job's placement and its
//! epoch), and runs the jobs placed on it ([`jobs`]).
//!
//! # Threads and tasks
//!
//! One glommio executor (unpinned: the jobs' shards own the cores) runs
//! every task of the node: the listener, one pump and one reader per peer
//! session, one task per client connection, and the ticker, which ticks
//! Raft, renews the lease, does the leader's duties and supervises the
//! runs. The node's state lives in one `RefCell`, borrowed only between
//! awaits.
//!
//! # Liveness and fencing
//!
//! A node runs its jobs only while it holds a lease:
//! - a follower asks the leader every [`lease::ASK_EVERY`]; the leader's
//!   grant is valid for `min(LEASE, what is left of the leader's own)`
//!   counted from when the follower *sent* the request, so it ends before
//!   the leader's record of having heard the follower ages by `LEASE`;
//! - the leader's own lease runs `LEASE` past the time it *sent* the
//!   latest probe a majority of the voters echoed (itself included; a
//!   voter echoes its own leader's probes only: [`lease::LeaderAcks`]);
//! - a grant counts only once the follower has applied the log as far as
//!   the leader had committed when granting, and a new leader's own only
//!   once it applied an entry of its term ([`lease`] has the arithmetic);
//! - the leader declares a node lost when it has heard nothing from it for
//!   [`LOST_AFTER`] (> `LEASE`), counting a new leader's reign as heard;
//!   only then does it place the node's jobs elsewhere (a new epoch).
//!
//! So by the time a job is placed anew, the node that ran it has held no
//! lease for `LOST_AFTER - LEASE`, and it stops a run (SIGKILL, reaped)
//! within a tick of its lease's end. This rests on the nodes' monotonic
//! clocks running at the same rate, within the margin. A node stalled
//! past the margin with its run going is caught by the run itself: it
//! claimed the job's data directory with its placement (`--fence-epoch`)
//! and commits nothing once a later placement has claimed it.
//!
//! # The log
//!
//! Every node compacts its own log (`--compact-every` entries applied past
//! its last snapshot, and after each membership change): a snapshot of the
//! state, with the entries after it kept. A follower behind what the
//! leader keeps gets the leader's snapshot, in parts when it is larger
//! than a frame ([`client::RAFT_PART_KIND`], [`Assembly`]).
//!
//! # Connections
//!
//! Between two nodes, the one with the lower id dials; the other serves
//! what it accepts (from any node that proved the secret). A client (id 0) gets a session per connection, for one
//! request and its reply.

pub mod client;
pub mod jobs;
pub mod lease;
pub mod load;
pub mod state;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Args;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpListener;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, RawNode, SnapshotStatus, StateRole, Storage};

use dirigo_net::conn::{accept, connect, Connection};
use dirigo_net::handshake::Identity;
use dirigo_net::link::{Backoff, Role, SendError};
use dirigo_net::session::{Session, SessionConfig};
use dirigo_storage::raftlog::RaftLog;

use client::{
    Reply, Request, CLIENT_NODE, LEASE_ECHO_KIND, LEASE_GRANT_KIND, LEASE_PROBE_KIND,
    LEASE_REQUEST_KIND, RAFT_KIND, RAFT_PART_KIND, REPLY_KIND, REQUEST_KIND,
};
use jobs::{monotonic_ns, Part, Run, RunEnd};
use lease::{FollowerLease, LeaderAcks, LEASE};
use load::{CpuMeter, Load, Report, UNMEASURED_MILLI};
use state::{data_dir_of, submission_number, Answer, ClusterState, Command, JobState, Outcome};

/// Why the leader moves a job when nothing else moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoveKind {
    /// Over more nodes (a node joined or came back, or a node of a
    /// narrowed job's is saturated).
    Widen,
    /// A narrowed job over more nodes, as it runs late: it then stays for
    /// `load::LOAD_MOVE_QUIET`, and is not narrowed or answered for running
    /// late again within `load::LATE_HOLD`.
    WidenLate,
    /// A part of a job that runs late, off a node busy with other parts
    /// onto an idler one: the job then stays as after `WidenLate`.
    Late,
    /// Onto fewer nodes, which hold it with room to spare: it then stays
    /// for `load::LOAD_MOVE_QUIET`, as after a move for load.
    Narrow,
    /// For load: the job then stays for `load::LOAD_MOVE_QUIET`.
    Load,
    /// By parts.
    Parts,
}

/// Raft's clock: one tick.
const TICK: Duration = Duration::from_millis(30);
/// Raft's election timeout in ticks (randomized up to twice this).
const ELECTION_TICKS: usize = 10;
/// Raft's heartbeat in ticks.
const HEARTBEAT_TICKS: usize = 2;
/// Silence after which the leader declares a node lost.
pub const LOST_AFTER: Duration = Duration::from_millis(900);
// A lost node's lease ended `LOST_AFTER - LEASE` before its jobs move.
const _: () = assert!(LOST_AFTER.as_millis() >= LEASE.as_millis() + 300);
/// The file in a node's data directory that says it left its cluster: a
/// node is not started on it again.
const REMOVED_FILE: &str = "removed";
/// Entries kept in memory up to a snapshot's index (see `maybe_compact`).
const KEEP_BEHIND: u64 = 128;
/// A node leaving the cluster that heard from no other for this long goes:
/// the leader stops speaking to a node once it is removed.
const LEFT_AFTER: Duration = Duration::from_secs(3);
/// A part that lost a peer after running less than this counts toward the
/// job's `RESTARTS_MAX` (one that never connects gives up after 30 s).
const QUICK_RUN: Duration = Duration::from_secs(60);
/// A part of a run over nodes that lost a peer waits this long for the
/// leader to move the job off a lost node before running it again where it
/// is (its peer may have left for a moment only).
const RESTART_AFTER: Duration = Duration::from_millis(600);
/// A part other than 0 of a run over nodes still running when part 0
/// reported the job's end is left this long to end by itself (and give
/// its summary) before it is stopped.
const PART_GRACE: Duration = Duration::from_secs(5);
/// A proposal not applied within this is proposed again.
const PROPOSE_AGAIN_AFTER: Duration = Duration::from_secs(2);
/// How long a client's request waits for its command to be proposed and
/// applied (less than a client waits for the reply, `REPLY_TIMEOUT`).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest command proposed (raft-rs sends at least one entry per
/// append, whatever its size).
const COMMAND_BYTES_MAX: usize = 16 * 1024;
/// Entries' bytes per Raft append message: with one entry of
/// `COMMAND_BYTES_MAX` over it, still well within a link frame (64 KiB).
const RAFT_MESSAGE_BYTES: u64 = 24 * 1024;
/// The most bytes of jobs a status reply lists (it must fit a frame).
const STATUS_JOBS_BYTES_MAX: usize = 40 * 1024;
/// A Raft message over a link frame's body (a snapshot of the state) goes
/// in parts of this many bytes, [`RAFT_PART_KIND`] messages.
const RAFT_PART_BYTES: usize = 48 * 1024;
/// The largest Raft message put together from parts. The state is bounded
/// ([`state::RUNNING_JOBS_MAX`], [`state::ENDED_JOBS_KEPT`], each job's
/// command at most `COMMAND_BYTES_MAX`, its report `jobs::REPORT_BYTES_MAX`
/// and its parts' summaries 16 of 512 bytes): its snapshot stays below.
const RAFT_ASSEMBLED_BYTES_MAX: usize = 14 * 1024 * 1024;

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Address to listen on for nodes and clients, e.g. 127.0.0.1:7001.
    #[arg(long)]
    listen: SocketAddr,
    /// Where the node keeps its id and its consensus log.
    #[arg(long)]
    data_dir: PathBuf,
    /// File holding the cluster's shared secret (at least 16 bytes).
    #[arg(long)]
    secret_file: PathBuf,
    /// A member's address: join its cluster (on the first start; a node
    /// with a consensus log rejoins what it knows).
    #[arg(long)]
    join: Option<SocketAddr>,
    /// The cluster's name: nodes and clients of another are refused.
    #[arg(long, default_value = "dirigo")]
    cluster: String,
    /// Test hook: while this file exists, the node drops every message to
    /// and from other nodes (a partition).
    #[arg(long, hide = true)]
    isolate_file: Option<PathBuf>,
    /// Compact the consensus log into a snapshot of the state once this
    /// many entries were applied since the last snapshot.
    #[arg(long, hide = true, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    compact_every: u64,
    /// Ports for the runs of jobs placed over several nodes, FIRST-LAST:
    /// the leader gives each part of such a placement one, on its node's
    /// address, no two running placements the same (the leader's range
    /// counts; give every node the same).
    #[arg(long, default_value = "7700-7999")]
    run_ports: PortRange,
    /// A job over several nodes that fits on fewer, with half their cores
    /// to spare, is narrowed onto them once it has for this long.
    #[arg(long, hide = true, default_value_t = load::NARROW_AFTER.as_millis() as u64)]
    narrow_after_ms: u64,
}

/// Raft's storage: the entries and hard state in memory (`MemStorage`,
/// kept in step with the durable [`RaftLog`]), and the latest snapshot of
/// the state, which `MemStorage` cannot build (it knows no state). A
/// follower too far behind for the entries kept gets this snapshot.
#[derive(Clone, Default)]
struct NodeStorage {
    mem: MemStorage,
    snapshot: Rc<RefCell<Snapshot>>,
}

impl Storage for NodeStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        self.mem.term(index)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snapshot = self.snapshot.borrow();
        let index = snapshot.get_metadata().index;
        if index == 0 || index < request_index {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot.clone())
    }
}

/// A command as the log holds it, if it is not too large.
fn encode_command(command: &Command) -> Result<Vec<u8>, String> {
    let data = serde_json::to_vec(command).expect("commands serialize");
    if data.len() > COMMAND_BYTES_MAX {
        return Err(format!(
            "the command is {} bytes, over the {COMMAND_BYTES_MAX} the cluster's log takes",
            data.len()
        ));
    }
    Ok(data)
}

/// A random u64 from the kernel.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    u64::from_le_bytes(bytes) ^ monotonic_ns()
}

/// This node's id: made on the first start and kept in the data directory.
fn node_id(data_dir: &Path) -> Result<u64, String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|id| *id != CLIENT_NODE)
            .ok_or_else(|| format!("{} holds no node id: {text:?}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Below 2^53: ids print exactly as JSON numbers.
            let id = (random_u64() & ((1 << 53) - 1)).max(1);
            dirigo_storage::manifest::commit_atomic(data_dir, "node-id", id.to_string().as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(id)
        }
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// Hold the data directory for this process (a lock on `DIR/lock`, released
/// when the process ends, however it ends): two nodes on one directory
/// would write one consensus log under one id.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = data_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "{} is another running node's data directory",
            data_dir.display()
        ));
    }
    Ok(file)
}

pub fn run(args: NodeArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("creating {}: {e}", args.data_dir.display()))?;
    let _lock = lock_data_dir(&args.data_dir)?;
    let secret = client::read_secret(&args.secret_file)?;
    let id = node_id(&args.data_dir)?;
    let removed = args.data_dir.join(REMOVED_FILE);
    if removed.exists() {
        return Err(format!(
            "node {id} left its cluster ({} says how); start a node on an empty data \
             directory to join again",
            removed.display()
        ));
    }
    // Checked before anything starts.
    Identity::new(&args.cluster, id, &secret)?;
    let program = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    glommio::LocalExecutorBuilder::default()
        .name("dirigo-node")
        .io_memory(1 << 20)
        .spawn(move || async move {
            let node = Node::open(args, id, secret, program)?;
            node.serve().await
        })
        .map_err(|e| format!("the node's executor did not start: {e}"))?
        .join()
        .map_err(|e| format!("the node's executor failed: {e}"))?
}

/// A part of a run over nodes that lost a peer.
#[derive(Debug, Clone)]
struct Lost {
    at: Instant,
    /// Its last words.
    why: String,
    /// It had run less than [`QUICK_RUN`] (a placement that loses a peer
    /// quickly again and again fails).
    quick: bool,
    /// It could not listen on its port: the placement runs again on other
    /// ports (from this node's `--run-ports`).
    new_ports: bool,
}

/// Where a node records the placements it started parts of.
const STARTED_DIR: &str = "started";

/// The placements this node's earlier processes started parts of: file
/// `DIR/started/N` (N a job's submission number) holds the epoch.
fn read_started(data_dir: &Path) -> Result<BTreeMap<u64, u64>, String> {
    let dir = data_dir.join(STARTED_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let mut started = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let Some(number) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue; // a temporary file left by a crash
        };
        let text = std::fs::read_to_string(entry.path())
            .map_err(|e| format!("reading {}: {e}", entry.path().display()))?;
        let epoch = text
            .trim()
            .parse()
            .map_err(|_| format!("{} holds no epoch", entry.path().display()))?;
        started.insert(number, epoch);
    }
    Ok(started)
}

/// Record, durably, that this node starts a part of placement `epoch` of
/// the job numbered `number` (before it does).
fn write_started(data_dir: &Path, number: u64, epoch: u64) -> Result<(), String> {
    use std::io::Write;
    let dir = data_dir.join(STARTED_DIR);
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let path = dir.join(number.to_string());
    let tmp = dir.join(format!("{number}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    file.write_all(epoch.to_string().as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(&dir, e))
}

/// Keep what a run that ended by itself says: an outcome to report; a
/// part other than part 0 that finished, which part 0 reports; or a part
/// that lost a peer, which is run again ([`RESTART_AFTER`]).
fn note_end(core: &mut Core, run: &Run, end: RunEnd, now: Instant) {
    let key = (run.job.clone(), run.epoch);
    let new_ports = matches!(end, RunEnd::PortTaken(_));
    match end {
        RunEnd::Outcome(Outcome::Finished { report }) if run.part > 0 => {
            core.parts_done.insert(key, report);
        }
        RunEnd::Outcome(outcome) => {
            core.ended.insert(key, outcome);
        }
        // A port taken is run again on other ports, and counts as quick.
        RunEnd::PeerLost(why) | RunEnd::PortTaken(why) => {
            let lost = Lost {
                at: now,
                why,
                quick: new_ports || now.duration_since(run.started) < QUICK_RUN,
                new_ports,
            };
            core.peer_lost.insert(key, lost);
        }
    }
}

/// ", and nodes 3, 4" for a placement's other nodes (nothing for none).
fn and_peers(peers: &[u64]) -> String {
    if peers.is_empty() {
        return String::new();
    }
    let list: Vec<String> = peers.iter().map(u64::to_string).collect();
    format!(
        " and node{} {}",
        if peers.len() > 1 { "s" } else { "" },
        list.join(", ")
    )
}

/// The leader's choice of a placement for a job of `shards` shards: the
/// least loaded live nodes in `load` (by the CPU their parts use, then by
/// their parts, then by id), as many as [`state::width`] allows,
/// part 0 the least loaded; for more than one, a port each from `range`
/// that no running placement uses (from `cursor` on, which moves past
/// them, so that a port is taken again only after the range went round).
/// `load` and `in_use` count what it chose (a part not measured yet
/// weighs [`UNMEASURED_MILLI`]). None: no live node, or too few free
/// ports.
fn place(
    load: &mut BTreeMap<u64, Load>,
    shards: u64,
    in_use: &mut BTreeSet<u16>,
    cursor: &mut u16,
    range: PortRange,
) -> Option<(u64, Vec<u64>, Vec<u16>)> {
    let nodes = least_loaded(load, state::width(shards, load.len()));
    ports_for(load, nodes, in_use, cursor, range)
}

/// The `k` least loaded nodes of `load` (by CPU, then parts, then id).
fn least_loaded(load: &BTreeMap<u64, Load>, k: usize) -> Vec<u64> {
    let mut by_load: Vec<(u32, usize, u64)> =
        load.iter().map(|(id, l)| (l.milli, l.parts, *id)).collect();
    by_load.sort_unstable();
    by_load.iter().take(k).map(|(_, _, id)| *id).collect()
}

/// A placement on `nodes` (part 0 the first): a port each from `range`
/// for more than one; `load` and `in_use` count it. None: no node, or too
/// few free ports.
fn ports_for(
    load: &mut BTreeMap<u64, Load>,
    nodes: Vec<u64>,
    in_use: &mut BTreeSet<u16>,
    cursor: &mut u16,
    range: PortRange,
) -> Option<(u64, Vec<u64>, Vec<u16>)> {
    let k = nodes.len();
    if nodes.is_empty() {
        return None;
    }
    let ports = if k > 1 {
        free_ports(k, in_use, cursor, range)?
    } else {
        Vec::new()
    };
    for node in &nodes {
        load.get_mut(node).expect("chosen from load").add(None);
    }
    Some((nodes[0], nodes[1..].to_vec(), ports))
}

/// `k` ports of `range` not in `in_use`, from `cursor` on (which moves past
/// them), taken into `in_use`; None if fewer are free.
fn free_ports(
    k: usize,
    in_use: &mut BTreeSet<u16>,
    cursor: &mut u16,
    range: PortRange,
) -> Option<Vec<u16>> {
    let size = u32::from(range.last - range.first) + 1;
    let mut ports = Vec::with_capacity(k);
    for step in 0..size {
        let port = range.first + ((u32::from(*cursor) + step) % size) as u16;
        if !in_use.contains(&port) {
            ports.push(port);
            if ports.len() == k {
                *cursor = ((u32::from(port - range.first) + 1) % size) as u16;
                in_use.extend(&ports);
                return Some(ports);
            }
        }
    }
    None
}

/// A figure of each running job's part on each node, by (node, job): the
/// leader's own runs' as it measures them, the others' from their fresh
/// reports (by job number). Parts not in it are not measured.
type PartView = BTreeMap<(u64, String), u32>;

/// The CPU each running job's part uses, in thousandths of a core.
type CpuView = PartView;

/// Each running job's part's output latency lately, in thousandths of the
/// job's SLO ([`Report::latency`]).
type LatencyView = PartView;

fn part_view<'a>(
    me: u64,
    state: &ClusterState,
    own: BTreeMap<String, u32>,
    reports: impl IntoIterator<Item = (u64, &'a BTreeMap<u64, u32>)>,
) -> PartView {
    let mut view: PartView = own
        .into_iter()
        .map(|(job, figure)| ((me, job), figure))
        .collect();
    let by_number: HashMap<u64, &str> = state
        .jobs
        .values()
        .filter(|j| j.state == JobState::Running)
        .map(|j| (submission_number(&j.name), j.name.as_str()))
        .collect();
    for (node, figures) in reports {
        for (number, figure) in figures {
            if let Some(name) = by_number.get(number) {
                view.insert((node, name.to_string()), *figure);
            }
        }
    }
    view
}

fn cpu_view(
    me: u64,
    state: &ClusterState,
    own: BTreeMap<String, u32>,
    reports: &HashMap<u64, (Report, Instant)>,
) -> CpuView {
    let reports = reports.iter().map(|(node, (r, _))| (*node, &r.parts));
    part_view(me, state, own, reports)
}

fn latency_view(
    me: u64,
    state: &ClusterState,
    own: BTreeMap<String, u32>,
    reports: &HashMap<u64, (Report, Instant)>,
) -> LatencyView {
    let reports = reports.iter().map(|(node, (r, _))| (*node, &r.latency));
    part_view(me, state, own, reports)
}

/// The output latency of this node's runs lately, by job
/// ([`Run::latency_permille`]).
fn own_latency(runs: &[Run], now: Instant) -> BTreeMap<String, u32> {
    runs.iter()
        .filter_map(|run| Some((run.job.clone(), run.latency_permille(now)?)))
        .collect()
}

/// The highest output latency of `job`'s parts lately, in thousandths of
/// its SLO; None if no part of it had output rows lately.
fn job_latency(job: &state::Job, latency: &LatencyView) -> Option<u32> {
    job.placement()
        .iter()
        .filter_map(|n| latency.get(&(*n, job.name.clone())).copied())
        .max()
}

/// Whether `job` leaves room in its SLO ([`load::SLO_ROOM`]: its parts'
/// latency p99 at most half of it), or says nothing of its latency: only
/// then may it be narrowed, or count as settled where it runs.
fn slo_room(job: &state::Job, latency: &LatencyView) -> bool {
    job_latency(job, latency).is_none_or(|p| p <= load::SLO_ROOM_PERMILLE)
}

/// Whether `job` runs late: a part's latency p99 over its SLO.
fn over_slo(job: &state::Job, latency: &LatencyView) -> bool {
    job_latency(job, latency).is_some_and(|p| p > load::SLO_PERMILLE)
}

/// The CPU of `job`'s part on `node`, where measured.
fn measured(cpu: &CpuView, node: u64, job: &str) -> Option<u32> {
    cpu.get(&(node, job.to_string())).copied()
}

/// The weight of a part of `job` on `node`: as measured, else
/// [`UNMEASURED_MILLI`].
fn part_milli(cpu: &CpuView, node: u64, job: &str) -> u32 {
    measured(cpu, node, job).unwrap_or(UNMEASURED_MILLI)
}

/// Thousandths of a core added up (saturating).
fn total_milli<'a>(milli: impl IntoIterator<Item = &'a u32>) -> u32 {
    milli
        .into_iter()
        .fold(0u32, |sum, m| sum.saturating_add(*m))
}

/// Per node of `live` (nodes not in it count none): the parts of running
/// jobs it has, and what they weigh ([`part_milli`]).
fn load_of(
    state: &ClusterState,
    live: impl Iterator<Item = u64>,
    cpu: &CpuView,
) -> BTreeMap<u64, Load> {
    let mut load: BTreeMap<u64, Load> = live.map(|id| (id, Load::default())).collect();
    for job in state.jobs.values() {
        if job.state == JobState::Running {
            for node in job.placement() {
                if let Some(l) = load.get_mut(&node) {
                    l.add(measured(cpu, node, &job.name));
                }
            }
        }
    }
    load
}

/// The ports of every running placement (and of moves under way), and
/// of each job over nodes that finished less than [`PART_GRACE`] (and a
/// second) before now by `finished_seen` (a part of it may still be
/// ending, listening on its port).
fn ports_in_use(
    state: &ClusterState,
    finished_seen: &HashMap<String, Instant>,
    now: Instant,
) -> BTreeSet<u16> {
    let ending = |j: &state::Job| {
        j.state == JobState::Finished
            && finished_seen
                .get(&j.name)
                .is_some_and(|at| now.duration_since(*at) < PART_GRACE + Duration::from_secs(1))
    };
    state
        .jobs
        .values()
        .filter(|j| j.state == JobState::Running || ending(j))
        .flat_map(|j| j.ports.iter().chain(&j.moving_ports).copied())
        .collect()
}

/// Note when this node first saw each job over nodes finished (for
/// `ports_in_use`); forget those the state no longer holds as finished.
fn note_finished(state: &ClusterState, finished_seen: &mut HashMap<String, Instant>, now: Instant) {
    finished_seen.retain(|name, _| {
        state
            .jobs
            .get(name)
            .is_some_and(|j| j.state == JobState::Finished)
    });
    for job in state.jobs.values() {
        if job.state == JobState::Finished && !job.ports.is_empty() {
            finished_seen.entry(job.name.clone()).or_insert(now);
        }
    }
}

/// The leader's move of `job` to `placement` (part 0's node, the others,
/// their ports), narrowed or not.
fn move_to(job: &state::Job, placement: (u64, Vec<u64>, Vec<u16>), narrowed: bool) -> Command {
    let (to, peers, ports) = placement;
    Command::Move {
        job: job.name.clone(),
        epoch: job.epoch,
        to,
        peers,
        ports,
        quick: false,
        narrowed,
    }
}

/// This node's cores, as it tells the leader (at most `u16::MAX`).
fn own_cores() -> u16 {
    dirigo_engine::runtime::online_cores().clamp(1, usize::from(u16::MAX)) as u16
}

/// What the leader measures of its nodes and jobs each tick.
#[derive(Clone, Copy)]
struct Figures<'a> {
    /// Each live node's weight.
    load: &'a BTreeMap<u64, Load>,
    cpu: &'a CpuView,
    /// Each member's cores, where known.
    cores: &'a BTreeMap<u64, u16>,
    /// Each running job's parts' output latency lately.
    latency: &'a LatencyView,
}

/// The leader's watch over its running jobs, each by name and placement:
/// since when it has fit on fewer nodes with room in its SLO
/// ([`narrow_to`], [`slo_room`]), fit where it runs with room in its SLO
/// ([`fits_where_it_is`]), and run late ([`over_slo`]); and the jobs it
/// answered for running late, and when. Forgotten when it stops leading.
#[derive(Debug, Default)]
struct Watch {
    narrowable: HashMap<(String, u64), Instant>,
    settled: HashMap<(String, u64), Instant>,
    late: HashMap<(String, u64), Instant>,
    late_answered: HashMap<String, Instant>,
}

/// The jobs the leader may act on ([`Watch::answers`]).
#[derive(Debug, PartialEq)]
struct Answers {
    /// Fit on fewer nodes for `narrow_after`: narrowed.
    ripe: BTreeSet<String>,
    /// Fit where they run for `narrow_after`: not widened over a node that
    /// joins.
    settled: BTreeSet<String>,
    /// Late for [`load::LATE_AFTER`]: widened, or a part moved.
    late: BTreeSet<String>,
}

impl Watch {
    /// Note each running job (not moving) as the figures show it at `now`:
    /// one that no longer fits, or no longer runs late, or runs in another
    /// placement, starts again; answers older than [`load::LATE_HOLD`] are
    /// forgotten.
    fn note(&mut self, state: &ClusterState, f: &Figures, now: Instant) {
        let (mut narrowable, mut settled, mut late) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        let since = |from: &HashMap<(String, u64), Instant>, key: &(String, u64)| {
            from.get(key).copied().unwrap_or(now)
        };
        for job in state.jobs.values() {
            if job.state != JobState::Running || job.moving_to.is_some() {
                continue;
            }
            let key = (job.name.clone(), job.epoch);
            let room = slo_room(job, f.latency);
            if room && narrow_to(job, f.load, f.cpu, f.cores).is_some() {
                narrowable.insert(key.clone(), since(&self.narrowable, &key));
            }
            if room && fits_where_it_is(job, f.load, f.cpu, f.cores) {
                settled.insert(key.clone(), since(&self.settled, &key));
            }
            if over_slo(job, f.latency) {
                late.insert(key.clone(), since(&self.late, &key));
            }
        }
        self.narrowable = narrowable;
        self.settled = settled;
        self.late = late;
        self.late_answered
            .retain(|_, at| now.duration_since(*at) < load::LATE_HOLD);
    }

    /// The jobs ripe for narrowing, settled and late at `now`; a job
    /// answered for running late within [`load::LATE_HOLD`] is neither
    /// ripe nor late.
    fn answers(&self, narrow_after: Duration, now: Instant) -> Answers {
        let long_enough = |since: &HashMap<(String, u64), Instant>, after: Duration| {
            since
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= after)
                .map(|((name, _), _)| name.clone())
                .collect::<BTreeSet<String>>()
        };
        let unanswered = |mut jobs: BTreeSet<String>| {
            jobs.retain(|name| !self.late_answered.contains_key(name));
            jobs
        };
        Answers {
            ripe: unanswered(long_enough(&self.narrowable, narrow_after)),
            settled: long_enough(&self.settled, narrow_after),
            late: unanswered(long_enough(&self.late, load::LATE_AFTER)),
        }
    }
}

/// What the leader weighs its one move by (`widen_or_rebalance`).
struct Weighing<'a> {
    /// The tick's figures of the nodes and jobs.
    f: Figures<'a>,
    /// Jobs moved for load or narrowed lately: moved for load or by parts
    /// by neither rule, nor narrowed.
    quiet: &'a BTreeSet<String>,
    /// Jobs that have fit on fewer nodes for the node's `narrow_after`.
    ripe: &'a BTreeSet<String>,
    /// Jobs that have fit where they run for the node's `narrow_after`:
    /// not widened merely because they could be.
    settled: &'a BTreeSet<String>,
    /// Jobs that have run late ([`over_slo`]) for `load::LATE_AFTER` in
    /// their placement.
    late: &'a BTreeSet<String>,
}

/// Why a job is widened.
enum Widen {
    /// It runs on fewer nodes than it could, not narrowed by the leader:
    /// a node joined or came back.
    Joined,
    /// Narrowed, and a node of it is saturated ([`saturated_node`]).
    Saturated(u64, u32, u16),
    /// Narrowed, and it runs late: its latency p99 in thousandths of its
    /// SLO.
    Late(u32),
}

/// Whether a running job fits where it runs: every part of it measured,
/// and each node of its placement holds its share ([`load::holds`], as
/// for narrowing: a core per shard, and at most half its cores used with
/// the job, its own part left out of its weight).
fn fits_where_it_is(
    job: &state::Job,
    load: &BTreeMap<u64, Load>,
    cpu: &CpuView,
    cores: &BTreeMap<u64, u16>,
) -> bool {
    let (Some(parts), Some(without)) = (measured_parts(job, cpu), without_job(load, job, cpu))
    else {
        return false;
    };
    let k = parts.len().max(1);
    let share = total_milli(&parts).div_ceil(k as u32);
    let per_node = job.shards() / k as u64;
    job.placement()
        .iter()
        .all(|n| load::holds(&without[n], cores.get(n).copied(), per_node, share))
}

/// The CPU of every part of `job`, in placement order; None if a part is
/// not measured.
fn measured_parts(job: &state::Job, cpu: &CpuView) -> Option<Vec<u32>> {
    job.placement()
        .iter()
        .map(|n| measured(cpu, *n, &job.name))
        .collect()
}

/// `load` without `job`'s parts (each as `Load::add` took it: measured,
/// or the guess); None if a node of its placement is not in it.
fn without_job(
    load: &BTreeMap<u64, Load>,
    job: &state::Job,
    cpu: &CpuView,
) -> Option<BTreeMap<u64, Load>> {
    let mut without = load.clone();
    for node in job.placement() {
        without
            .get_mut(&node)?
            .remove(measured(cpu, node, &job.name));
    }
    Some(without)
}

/// The nodes a running job over several nodes could run on instead:
/// the fewest (a count that divides its shards, under its placement's)
/// of the least loaded live nodes, each of which holds its share
/// ([`load::holds`]: a core per shard, and with the job's CPU, measured
/// over every part of it, split evenly, at most half its cores used; its
/// own parts there left out of its weight). None if no narrower
/// placement holds it, or a part of it, or of a node it would go to, is
/// not measured.
fn narrow_to(
    job: &state::Job,
    load: &BTreeMap<u64, Load>,
    cpu: &CpuView,
    cores: &BTreeMap<u64, u16>,
) -> Option<Vec<u64>> {
    let placement = job.placement();
    let shards = job.shards();
    if placement.len() < 2 {
        return None;
    }
    let milli = total_milli(&measured_parts(job, cpu)?);
    let without = without_job(load, job, cpu)?;
    (1..placement.len())
        .filter(|d| shards.is_multiple_of(*d as u64))
        .find_map(|d| {
            let nodes = least_loaded(&without, d);
            let share = milli.div_ceil(d as u32);
            let per_node = shards / d as u64;
            let hold = |n: &u64| load::holds(&without[n], cores.get(n).copied(), per_node, share);
            (nodes.len() == d && nodes.iter().all(hold)).then_some(nodes)
        })
}

/// A node of `job`'s placement that is saturated ([`load::saturated`])
/// with a measured part of the job of a quarter of a core or more there,
/// and what it uses: a job narrowed onto it is widened again.
fn saturated_node(job: &state::Job, w: &Weighing) -> Option<(u64, u32, u16)> {
    job.placement().into_iter().find_map(|n| {
        let cores = w.f.cores.get(&n).copied()?;
        let weight = w.f.load.get(&n)?;
        let part = measured(w.f.cpu, n, &job.name)?;
        (load::saturated(weight, Some(cores)) && part >= UNMEASURED_MILLI).then_some((
            n,
            weight.milli,
            cores,
        ))
    })
}

/// Where a part of `job`, which runs late, would go: from the node of its
/// placement whose other parts use the most CPU to the live node not in
/// it whose parts use the least, when that is at least
/// [`load::LOAD_GAIN_MILLI`] less, every part on both measured, and the
/// target has a core per shard of the part (where its cores are known).
/// The nodes, and what the other parts on each use.
fn late_part_move(job: &state::Job, w: &Weighing) -> Option<(u64, u64, u32, u32)> {
    let without = without_job(w.f.load, job, w.f.cpu)?;
    let per_node = job.shards() / job.placement().len().max(1) as u64;
    let (from, busy) = job
        .placement()
        .into_iter()
        .map(|n| (n, without[&n]))
        .max_by_key(|(n, l)| (l.milli, std::cmp::Reverse(*n)))?;
    let (to, idle) = without
        .iter()
        .filter(|(n, l)| !job.runs_on(**n) && l.unmeasured == 0)
        .filter(|(n, _)| w.f.cores.get(n).is_none_or(|c| u64::from(*c) >= per_node))
        .min_by_key(|(n, l)| (l.milli, **n))?;
    (busy.unmeasured == 0 && busy.milli >= idle.milli.saturating_add(load::LOAD_GAIN_MILLI))
        .then_some((from, *to, busy.milli, idle.milli))
}

/// The leader's one move while nothing else moves or is placed, and why:
/// - narrow the oldest job in `ripe` (it has fit on fewer nodes for a
///   while, [`narrow_to`]) onto the fewest that hold it, unless it is in
///   `quiet`;
/// - else widen the oldest job that runs on fewer nodes than it could (a
///   node joined or came back; its own parts count for nothing where it
///   goes): one the leader narrowed, only when it runs late (in `late`)
///   or a node of it is saturated ([`saturated_node`]);
/// - else move a part of the oldest job in `late` off the node of its
///   placement busiest with other jobs' parts onto the idlest node not in
///   its placement, with a core per shard of the part, when the other
///   parts there use at least [`load::LOAD_GAIN_MILLI`] less (every part
///   on both nodes measured);
/// - else, for load ([`load::rebalance`]): move the part that narrows the
///   gap between the busiest node by CPU and the idlest most, while that
///   gap is half a core or more and the move narrows it by a quarter or
///   more (measured parts only, and only while every part on both nodes
///   is measured);
/// - else, while the live node with the most parts runs two more than the
///   one with the fewest, move its newest job's part there, if that part's
///   CPU leaves the target no busier than the source (a part not measured
///   counts [`UNMEASURED_MILLI`]), and only onto a node whose parts are
///   all measured unless no part anywhere is (a part just moved for load
///   weighs that guess, and its node must not take another on it).
///
/// A job in `quiet` (moved for load or lateness, or narrowed lately) moves
/// for none of the last three, and is not widened if narrowed.
fn widen_or_rebalance(
    state: &ClusterState,
    w: &Weighing,
    in_use: &mut BTreeSet<u16>,
    cursor: &mut u16,
    range: PortRange,
) -> Option<(Command, MoveKind, String)> {
    let (load, cpu, quiet) = (w.f.load, w.f.cpu, w.quiet);
    let whole = |j: &&state::Job| {
        j.state == JobState::Running
            && j.node.is_some()
            && j.moving_to.is_none()
            && j.placement().iter().all(|n| load.contains_key(n))
    };
    // Its ports free for its next placement.
    let free_of = |job: &state::Job| {
        let mut free = in_use.clone();
        for port in &job.ports {
            free.remove(port);
        }
        free
    };
    let ripe = state
        .jobs
        .values()
        .filter(whole)
        .filter(|j| w.ripe.contains(&j.name) && !quiet.contains(&j.name))
        .filter_map(|j| Some((j, narrow_to(j, load, cpu, w.f.cores)?)))
        .min_by_key(|(j, _)| submission_number(&j.name));
    if let Some((job, nodes)) = ripe {
        let mut free = free_of(job);
        let mut load = load.clone();
        let milli = measured_parts(job, cpu).map_or(0, |parts| total_milli(&parts));
        if let Some(placement) = ports_for(&mut load, nodes, &mut free, cursor, range) {
            in_use.extend(&placement.2);
            let why = format!(
                "narrowing it from {} nodes onto {}: its parts use {:.2} cores",
                job.placement().len(),
                placement.1.len() + 1,
                f64::from(milli) / 1e3
            );
            return Some((move_to(job, placement, true), MoveKind::Narrow, why));
        }
        // No ports free for it: widen or rebalance instead.
    }
    let live = load.len();
    let widen = state
        .jobs
        .values()
        .filter(whole)
        .filter(|j| j.placement().len() < state::width(j.shards(), live))
        .filter_map(|j| match j.narrowed {
            false if w.settled.contains(&j.name) => None,
            false => Some((j, Widen::Joined)),
            // Not right after it was narrowed: its first figures there,
            // catching up from its checkpoint, say nothing of its load.
            true if quiet.contains(&j.name) => None,
            true if w.late.contains(&j.name) => {
                Some((j, Widen::Late(job_latency(j, w.f.latency)?)))
            }
            true => {
                let (node, milli, cores) = saturated_node(j, w)?;
                Some((j, Widen::Saturated(node, milli, cores)))
            }
        })
        .min_by_key(|(j, _)| submission_number(&j.name));
    if let Some((job, widen)) = widen {
        let mut load = without_job(load, job, cpu).expect("whole");
        let mut free = free_of(job);
        if let Some(placement) = place(&mut load, job.shards(), &mut free, cursor, range) {
            in_use.extend(&placement.2);
            let mut why = format!("widening it over {} nodes", placement.1.len() + 1);
            let kind = match widen {
                Widen::Joined => MoveKind::Widen,
                Widen::Saturated(node, milli, cores) => {
                    why.push_str(&format!(
                        ": node {node} uses {:.2} of its {cores} cores",
                        f64::from(milli) / 1e3
                    ));
                    MoveKind::Widen
                }
                Widen::Late(permille) => {
                    why.push_str(&format!(
                        ": its latency p99 is {:.2} of its SLO",
                        f64::from(permille) / 1e3
                    ));
                    MoveKind::WidenLate
                }
            };
            return Some((move_to(job, placement, false), kind, why));
        }
        // No ports free for it: rebalance instead.
    }
    let swap = |job: &state::Job, from: u64, to: u64| {
        let swap = |n: u64| if n == from { to } else { n };
        Command::Move {
            job: job.name.clone(),
            epoch: job.epoch,
            to: swap(job.node.expect("whole")),
            peers: job.peers.iter().map(|n| swap(*n)).collect(),
            ports: job.ports.clone(),
            quick: false,
            narrowed: job.narrowed,
        }
    };
    let movable = || {
        state
            .jobs
            .values()
            .filter(whole)
            .filter(|j| !quiet.contains(&j.name))
    };
    let late = movable()
        .filter(|j| w.late.contains(&j.name))
        .filter_map(|j| Some((j, late_part_move(j, w)?)))
        .min_by_key(|(j, _)| submission_number(&j.name));
    if let Some((job, (from, to, from_milli, to_milli))) = late {
        let why = format!(
            "its latency p99 is {:.2} of its SLO: the other parts on node {from} use {:.2} cores, on node {to} {:.2}",
            f64::from(job_latency(job, w.f.latency).unwrap_or(0)) / 1e3,
            f64::from(from_milli) / 1e3,
            f64::from(to_milli) / 1e3
        );
        return Some((swap(job, from, to), MoveKind::Late, why));
    }
    let candidates: Vec<(String, BTreeMap<u64, Option<u32>>)> = movable()
        .map(|j| {
            let parts = j
                .placement()
                .into_iter()
                .map(|n| (n, measured(cpu, n, &j.name)))
                .collect();
            (j.name.clone(), parts)
        })
        .collect();
    if let Some(chosen) = load::rebalance(load, &candidates) {
        let why = format!(
            "rebalance by load: node {} uses {:.2} cores, node {} {:.2}; its part there {:.2}",
            chosen.from,
            f64::from(chosen.from_milli) / 1e3,
            chosen.to,
            f64::from(chosen.to_milli) / 1e3,
            f64::from(chosen.part_milli) / 1e3
        );
        let command = swap(&state.jobs[&chosen.job], chosen.from, chosen.to);
        return Some((command, MoveKind::Load, why));
    }
    let busiest = load
        .iter()
        .max_by_key(|(id, l)| (l.parts, std::cmp::Reverse(**id)));
    let idlest = load.iter().min_by_key(|(id, l)| (l.parts, **id));
    let ((&from, most), (&to, least)) = (busiest?, idlest?);
    let any_measured = load.values().any(|l| l.parts > l.unmeasured);
    if most.parts < least.parts + 2 || (least.unmeasured > 0 && any_measured) {
        return None;
    }
    let job = movable()
        .filter(|j| j.runs_on(from) && !j.runs_on(to))
        .filter(|j| {
            let part = part_milli(cpu, from, &j.name);
            least.milli.saturating_add(part) <= most.milli.saturating_sub(part)
        })
        .max_by_key(|j| submission_number(&j.name))?;
    let why = format!(
        "rebalance by parts: node {from} runs {}, node {to} {}",
        most.parts, least.parts
    );
    Some((swap(job, from, to), MoveKind::Parts, why))
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

/// The figures of a part's summary that `merged_report` adds up.
const SUMMED: [&str; 10] = [
    "events",
    "skipped",
    "late",
    "outputs",
    "deadline_misses",
    "messages",
    "cores",
    "stalls",
    "deactivations",
    "scale_actions",
];

/// What of a part's summary goes in the log: the figures
/// [`merged_report`] reads (a few hundred bytes).
fn part_summary(report: &serde_json::Value) -> serde_json::Value {
    let mut kept = JsonMap::new();
    let Some(report) = report.as_object() else {
        return serde_json::Value::Object(kept);
    };
    for key in SUMMED.iter().chain(&["elapsed_s", "slo_violation_pct"]) {
        if let Some(value) = report.get(*key) {
            kept.insert((*key).into(), value.clone());
        }
    }
    if let Some(max) = report.get("latency_us").and_then(|l| l.get("max")) {
        kept.insert("latency_us".into(), serde_json::json!({ "max": max }));
    }
    serde_json::Value::Object(kept)
}

/// The figures of a job: part 0's summary, with those of the other parts
/// of a run over nodes that reported (`PartEnded`) added in: counts
/// summed, `elapsed_s` the longest and the rates from those,
/// `slo_violation_pct` over every part's rows, `latency_us.max` the
/// largest; the latency percentiles and `queue_us_p99` stay part 0's (a
/// percentile of the whole cannot be made from the parts'). With the
/// number of parts whose figures these are (`parts_reported`).
fn merged_report(part0: &JsonMap, others: &[&JsonMap]) -> JsonMap {
    let mut merged = part0.clone();
    if others.is_empty() {
        return merged;
    }
    let all: Vec<&JsonMap> = std::iter::once(part0)
        .chain(others.iter().copied())
        .collect();
    let sum = |key: &str| {
        all.iter()
            .filter_map(|r| r.get(key)?.as_u64())
            .fold(0u64, u64::saturating_add)
    };
    for key in SUMMED {
        if part0.get(key).is_some_and(serde_json::Value::is_u64) {
            merged.insert(key.into(), sum(key).into());
        }
    }
    let elapsed_s = all
        .iter()
        .filter_map(|r| r.get("elapsed_s")?.as_f64())
        .fold(0.0, f64::max);
    if elapsed_s > 0.0 {
        let events_per_s = sum("events") as f64 / elapsed_s;
        merged.insert("elapsed_s".into(), elapsed_s.into());
        merged.insert("events_per_s".into(), events_per_s.into());
        let cores = sum("cores");
        if cores > 0 {
            merged.insert(
                "events_per_s_per_core".into(),
                (events_per_s / cores as f64).into(),
            );
        }
    }
    let rows = sum("outputs");
    if rows > 0 && part0.contains_key("slo_violation_pct") {
        let violating: f64 = all
            .iter()
            .filter_map(|r| {
                let pct = r.get("slo_violation_pct")?.as_f64()?;
                Some(pct * r.get("outputs")?.as_u64()? as f64)
            })
            .sum();
        merged.insert("slo_violation_pct".into(), (violating / rows as f64).into());
    }
    let max = all
        .iter()
        .filter_map(|r| r.get("latency_us")?.get("max")?.as_u64())
        .max();
    if let (Some(serde_json::Value::Object(latency)), Some(max)) =
        (merged.get_mut("latency_us"), max)
    {
        latency.insert("max".into(), max.into());
    }
    merged.insert("parts_reported".into(), all.len().into());
    merged
}

/// Whether `key` was proposed less than [`PROPOSE_AGAIN_AFTER`] ago (its
/// proposal may still be applied: not proposed again before).
fn proposed_lately(proposed: &HashMap<String, Instant>, key: &str, now: Instant) -> bool {
    proposed
        .get(key)
        .is_some_and(|at| now.duration_since(*at) < PROPOSE_AGAIN_AFTER)
}

/// Ports `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<PortRange, String> {
        let bad = || format!("{text:?} is not a port range FIRST-LAST (e.g. 7700-7999)");
        let (first, last) = text.split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// A client's reply to a command agreed (or not): what `expected` makes of
/// the answer, the refusal or failure as an error, or any other answer as
/// an unexpected one.
fn reply(agreed: Result<Answer, String>, expected: impl FnOnce(Answer) -> Option<Reply>) -> Reply {
    match agreed {
        Ok(Answer::Refused(message)) | Err(message) => Reply::Error { message },
        Ok(answer) => {
            let text = format!("{answer:?}");
            expected(answer).unwrap_or_else(|| Reply::Error {
                message: format!("unexpected answer {text}"),
            })
        }
    }
}

/// Nodes the state says are leaving, with no time yet for it (a state from
/// a snapshot): counted from now, which is later than when it was applied.
fn note_leaving(core: &mut Core, id: u64, snapshot: u64) {
    if core.state.nodes.get(&id).is_some_and(|n| n.retired) && core.retired_index == 0 {
        core.retired_index = snapshot;
    }
    let now = Instant::now();
    let leaving: Vec<u64> = core
        .state
        .nodes
        .iter()
        .filter(|(_, info)| info.retired)
        .map(|(id, _)| *id)
        .collect();
    for id in leaving {
        core.retired_at.entry(id).or_insert(now);
    }
}

/// A Raft message put together from its parts ([`RAFT_PART_KIND`]), which
/// a session delivers in order; a part 0 starts a new one (the parts of an
/// earlier one lost with a peer's restart are dropped).
#[derive(Default)]
struct Assembly {
    bytes: Vec<u8>,
    next: u32,
    parts: u32,
}

impl Assembly {
    /// Take one part: the whole message once its last part came.
    fn take(&mut self, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if body.len() < 8 {
            return Err(format!(
                "a part of {} bytes, short of its header",
                body.len()
            ));
        }
        let word = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let (part, parts) = (word(0), word(4));
        if part == 0 {
            self.bytes.clear();
            self.next = 0;
            self.parts = parts;
        }
        let fits = (parts as usize).saturating_mul(RAFT_PART_BYTES)
            <= RAFT_ASSEMBLED_BYTES_MAX + RAFT_PART_BYTES;
        if part != self.next || parts != self.parts || part >= parts || !fits {
            let why = format!(
                "part {part} of {parts} where part {} of {} was next",
                self.next, self.parts
            );
            *self = Assembly::default();
            return Err(why);
        }
        self.bytes.extend_from_slice(&body[8..]);
        if self.bytes.len() > RAFT_ASSEMBLED_BYTES_MAX {
            *self = Assembly::default();
            return Err(format!("over {RAFT_ASSEMBLED_BYTES_MAX} bytes"));
        }
        self.next += 1;
        if self.next < parts {
            return Ok(None);
        }
        let whole = std::mem::take(&mut self.bytes);
        *self = Assembly::default();
        Ok(Some(whole))
    }
}

/// Whatever the node is and knows; one `RefCell` in [`Node`].
struct Core {
    raft: RawNode<NodeStorage>,
    log: RaftLog,
    /// The index the latest snapshot stands for (0: none), and how many
    /// entries applied past it make the next.
    compacted: u64,
    compact_every: u64,
    /// The membership changed since the last snapshot: take one now. A
    /// node restores a snapshot only if its membership names it, so one
    /// that joins must get a snapshot taken after it was added.
    membership_changed: bool,
    voters: Vec<u64>,
    /// Members still catching up: they get the log but do not vote.
    learners: Vec<u64>,
    state: ClusterState,
    /// Addresses learnt before the log said them (a join's reply).
    known_addrs: BTreeMap<u64, String>,
    /// Requests waiting for their command to be applied.
    waiting: HashMap<u64, LocalSender<Answer>>,
    /// Per peer: when a message from it last arrived.
    heard: HashMap<u64, Instant>,
    /// Nodes leaving (`Retire`): when this node applied that.
    retired_at: HashMap<u64, Instant>,
    /// The index of this node's own `Retire`, or of the snapshot that holds
    /// it (0: not leaving).
    retired_index: u64,
    /// This node, leaving, is asking the others whether it was removed,
    /// and when it last finished asking.
    confirming: bool,
    removal_asked: Option<Instant>,
    leader_since: Option<Instant>,
    /// The follower's lease; the leader computes its own. A grant names the
    /// leader's commit index: it counts only once this node has applied
    /// that far (it must know of every placement made before the grant).
    lease: FollowerLease,
    /// The leader's: its voters' echoes of its probes, for its own lease.
    acks: LeaderAcks,
    /// The last log index applied to `state`.
    applied: u64,
    /// What the leader proposed and when, not proposed again before
    /// `PROPOSE_AGAIN_AFTER`.
    proposed: HashMap<String, Instant>,
    runs: Vec<Run>,
    /// Runs that ended by themselves, until the log records it.
    ended: BTreeMap<(String, u64), Outcome>,
    /// Parts other than part 0 of a run over nodes that finished, with
    /// their summaries: part 0 reports the job's end (and its figures);
    /// these are not run again, and their summaries go in the log
    /// (`PartEnded`) for `status` to add up.
    parts_done: BTreeMap<(String, u64), Option<serde_json::Value>>,
    /// Jobs over nodes that finished, and when this node first saw it
    /// (noted each tick): their ports stay taken a while
    /// (`ports_in_use`), and a part of one still running here is left
    /// [`PART_GRACE`] to end by itself.
    finished_seen: HashMap<String, Instant>,
    /// Parts of a run over nodes that lost a peer, and when: if the
    /// placement still stands after [`RESTART_AFTER`], this node moves the
    /// job to the same placement, to run it again.
    peer_lost: BTreeMap<(String, u64), Lost>,
    /// Per job (by its submission number): the latest placement this node
    /// started a part of a run over nodes for, kept in `DIR/started/` so
    /// that no process of this node starts a part twice in one placement
    /// (its peers would have run on without it).
    started: BTreeMap<u64, u64>,
    /// The next run port to try (an offset in `run_ports`): the leader's
    /// placements and this node's runs again on other ports take from it.
    port_cursor: u16,
    /// The leader's placements proposed lately, by key, and their ports:
    /// taken until applied (or `PROPOSE_AGAIN_AFTER`).
    promised: BTreeMap<String, (Instant, Vec<u16>)>,
    /// The CPU this node's runs use.
    meter: CpuMeter,
    /// The leader's: each follower's latest report of its parts' CPU and
    /// latency (by job number), and when it came.
    reports: HashMap<u64, (Report, Instant)>,
    /// The leader's: jobs it moved for load or narrowed, and when (not
    /// moved for load again within `load::LOAD_MOVE_QUIET`).
    load_moved: HashMap<String, Instant>,
    /// Each member's cores, as its lease requests say (this node's own
    /// from the start).
    cores: BTreeMap<u64, u16>,
    /// The leader's: how long each job has fit on fewer nodes, fit where
    /// it runs, or run late.
    watch: Watch,
    isolated: bool,
    isolated_checked: Option<Instant>,
}

struct Node {
    id: u64,
    data_dir: PathBuf,
    listen: SocketAddr,
    identity: Identity,
    cluster: String,
    secret: Vec<u8>,
    /// The secret's file, for runs over nodes (`dirigo run --secret-file`).
    secret_file: PathBuf,
    run_ports: PortRange,
    /// This machine's online cores: a run with more shards oversubscribes.
    online: usize,
    /// How long a job must fit on fewer nodes before it is narrowed.
    narrow_after: Duration,
    program: PathBuf,
    join: Option<SocketAddr>,
    isolate_file: Option<PathBuf>,
    incarnation: u64,
    core: RefCell<Core>,
    peers: RefCell<HashMap<u64, Session>>,
}

fn storage_error(e: dirigo_storage::StorageError) -> String {
    e.to_string()
}

impl Node {
    fn open(
        args: NodeArgs,
        id: u64,
        secret: Vec<u8>,
        program: PathBuf,
    ) -> Result<Rc<Node>, String> {
        let identity = Identity::new(&args.cluster, id, &secret)?;
        let (mut log, replayed) =
            RaftLog::open(&args.data_dir.join("raft.log")).map_err(storage_error)?;
        let storage = NodeStorage::default();
        let fresh = replayed.snapshot.is_none()
            && replayed.entries.is_empty()
            && replayed.hard_state.is_none()
            && replayed.membership.is_none();
        let mut voters = Vec::new();
        let mut learners = Vec::new();
        // The state as of the snapshot the log starts with, if any; the
        // entries after it are applied again as Raft hands them over.
        let mut state = ClusterState::default();
        let mut compacted = 0;
        if let Some((index, bytes)) = &replayed.snapshot {
            let mut snapshot = Snapshot::default();
            snapshot
                .merge_from_bytes(bytes)
                .map_err(|e| format!("the consensus log's snapshot at {index}: {e}"))?;
            state = serde_json::from_slice(&snapshot.data)
                .map_err(|e| format!("the state in the consensus log's snapshot: {e}"))?;
            let cs = snapshot.get_metadata().get_conf_state();
            voters = cs.voters.clone();
            learners = cs.learners.clone();
            compacted = *index;
            storage
                .mem
                .wl()
                .apply_snapshot(snapshot.clone())
                .map_err(|e| format!("replaying the consensus log's snapshot: {e}"))?;
            *storage.snapshot.borrow_mut() = snapshot;
        }
        if let Some(bytes) = &replayed.membership {
            let mut cs = ConfState::default();
            cs.merge_from_bytes(bytes)
                .map_err(|e| format!("the consensus log's membership: {e}"))?;
            voters = cs.voters.clone();
            learners = cs.learners.clone();
            storage.mem.wl().set_conf_state(cs);
        } else if fresh && args.join.is_none() {
            // The first node: a cluster of one.
            let cs = ConfState {
                voters: vec![id],
                ..Default::default()
            };
            log.set_membership(&cs.write_to_bytes().expect("encodes"))
                .and_then(|_| log.sync())
                .map_err(storage_error)?;
            voters = cs.voters.clone();
            storage.mem.wl().set_conf_state(cs);
        }
        let mut entries = Vec::with_capacity(replayed.entries.len());
        for (index, bytes) in &replayed.entries {
            let mut entry = Entry::default();
            entry
                .merge_from_bytes(bytes)
                .map_err(|e| format!("the consensus log's entry {index}: {e}"))?;
            entries.push(entry);
        }
        storage
            .mem
            .wl()
            .append(&entries)
            .map_err(|e| format!("replaying the consensus log: {e}"))?;
        if let Some(bytes) = &replayed.hard_state {
            let mut hs = HardState::default();
            hs.merge_from_bytes(bytes)
                .map_err(|e| format!("the consensus log's hard state: {e}"))?;
            storage.mem.wl().set_hardstate(hs);
        }
        let config = raft::Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            check_quorum: true,
            pre_vote: true,
            // Entries per append message; each entry is at most
            // COMMAND_BYTES_MAX, and a message must fit a link frame.
            max_size_per_msg: RAFT_MESSAGE_BYTES,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raft = RawNode::new(&config, storage, &logger)
            .map_err(|e| format!("starting consensus: {e}"))?;
        eprintln!(
            "dirigo node {id}: listening on {}, {}{} consensus entries replayed{}",
            args.listen,
            if compacted > 0 {
                format!("a snapshot through entry {compacted} and ")
            } else {
                String::new()
            },
            entries.len(),
            if voters.is_empty() && learners.is_empty() {
                format!(", joining through {:?}", args.join)
            } else {
                format!(", voters {voters:?}, learners {learners:?}")
            }
        );
        let node = Rc::new(Node {
            id,
            data_dir: args.data_dir.clone(),
            listen: args.listen,
            identity,
            cluster: args.cluster,
            secret,
            secret_file: std::path::absolute(&args.secret_file)
                .unwrap_or_else(|_| args.secret_file.clone()),
            run_ports: args.run_ports,
            online: dirigo_engine::runtime::online_cores(),
            narrow_after: Duration::from_millis(args.narrow_after_ms),
            program,
            join: args.join,
            isolate_file: args.isolate_file,
            incarnation: random_u64(),
            core: RefCell::new(Core {
                raft,
                log,
                compacted,
                compact_every: args.compact_every,
                membership_changed: false,
                voters,
                learners,
                state,
                known_addrs: BTreeMap::new(),
                waiting: HashMap::new(),
                heard: HashMap::new(),
                retired_at: HashMap::new(),
                retired_index: 0,
                confirming: false,
                removal_asked: None,
                leader_since: None,
                lease: FollowerLease::default(),
                acks: LeaderAcks::default(),
                applied: compacted,
                proposed: HashMap::new(),
                runs: Vec::new(),
                ended: BTreeMap::new(),
                parts_done: BTreeMap::new(),
                finished_seen: HashMap::new(),
                peer_lost: BTreeMap::new(),
                started: read_started(&args.data_dir)?,
                port_cursor: 0,
                promised: BTreeMap::new(),
                meter: CpuMeter::default(),
                reports: HashMap::new(),
                load_moved: HashMap::new(),
                cores: [(id, own_cores())].into(),
                watch: Watch::default(),
                isolated: false,
                isolated_checked: None,
            }),
            peers: RefCell::new(HashMap::new()),
        });
        note_leaving(&mut node.core.borrow_mut(), id, compacted);
        Ok(node)
    }

    async fn serve(self: Rc<Self>) -> Result<(), String> {
        let listener = TcpListener::bind(self.listen)
            .map_err(|e| format!("listening on {}: {e}", self.listen))?;
        glommio::spawn_local(self.clone().tick_loop()).detach();
        let member = {
            let core = self.core.borrow();
            !core.voters.is_empty() || !core.learners.is_empty()
        };
        if !member {
            if let Some(addr) = self.join {
                glommio::spawn_local(self.clone().join_loop(addr)).detach();
            }
        } else {
            glommio::spawn_local(self.clone().announce_loop()).detach();
        }
        loop {
            let stream = match listener.accept().await {
                Ok(stream) => stream,
                Err(e) => {
                    eprintln!("dirigo node {}: accept: {e}", self.id);
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let node = self.clone();
            glommio::spawn_local(async move {
                let config = SessionConfig::default();
                match accept(stream, &node.identity, &config.conn).await {
                    Ok(conn) => node.serve_connection(conn).await,
                    Err((addr, e)) => eprintln!(
                        "dirigo node {}: refused a connection from {}: {e}",
                        node.id,
                        addr.map_or("an unknown address".into(), |a| a.to_string())
                    ),
                }
            })
            .detach();
        }
    }

    async fn serve_connection(self: Rc<Self>, conn: Connection) {
        let peer = conn.peer().node;
        if peer == CLIENT_NODE {
            let session = Session::new(SessionConfig::default(), self.incarnation);
            let pump = glommio::spawn_local({
                let session = session.clone();
                async move {
                    session.serve(conn, Role::Server).await;
                    session.stop();
                }
            });
            while let Some((kind, body)) = session.recv_wait().await {
                if kind != REQUEST_KIND {
                    continue;
                }
                let reply = match serde_json::from_slice::<Request>(&body) {
                    Ok(request) => self.clone().answer(request).await,
                    Err(e) => Reply::Error {
                        message: format!("a malformed request: {e}"),
                    },
                };
                let body = serde_json::to_vec(&reply).expect("replies serialize");
                if session.send_wait(REPLY_KIND, body).await.is_err() {
                    break;
                }
            }
            pump.await;
            return;
        }
        if peer == self.id {
            eprintln!(
                "dirigo node {}: refused a connection claiming this node's id",
                self.id
            );
            return;
        }
        let session = self.session(peer);
        session.serve(conn, Role::Server).await;
    }

    /// The session to `peer`, made (with its reader, and its dialer if this
    /// node dials) on first use.
    fn session(self: &Rc<Self>, peer: u64) -> Session {
        if let Some(session) = self.peers.borrow().get(&peer) {
            return session.clone();
        }
        let session = Session::new(SessionConfig::default(), self.incarnation);
        self.peers.borrow_mut().insert(peer, session.clone());
        glommio::spawn_local(self.clone().read_loop(peer, session.clone())).detach();
        if self.id < peer {
            glommio::spawn_local(self.clone().dial_loop(peer, session.clone())).detach();
        }
        session
    }

    async fn dial_loop(self: Rc<Self>, peer: u64, session: Session) {
        let mut backoff = Backoff::new(10_000_000, 1_000_000_000, self.incarnation ^ peer);
        let config = SessionConfig::default();
        let mut failures = 0u64;
        // Until the peer left the cluster (its session dropped).
        while self.peers.borrow().contains_key(&peer) {
            let addr = self.addr_of(peer);
            if let Some(addr) = addr {
                match connect(addr, &self.identity, &config.conn).await {
                    Ok(conn) if conn.peer().node == peer => {
                        failures = 0;
                        let before = session.stats().delivered;
                        session.serve(conn, Role::Client).await;
                        // Only a connection that carried something resets
                        // the backoff (one refused after its handshake does
                        // not make this dial in a tight loop).
                        if session.stats().delivered > before {
                            backoff.reset();
                        }
                    }
                    Ok(conn) => eprintln!(
                        "dirigo node {}: {addr} is node {}, not {peer}",
                        self.id,
                        conn.peer().node
                    ),
                    Err(e) => {
                        failures += 1;
                        if failures % 50 == 1 {
                            eprintln!(
                                "dirigo node {}: dialing node {peer} at {addr} ({failures} tries): {e}",
                                self.id
                            );
                        }
                    }
                }
            }
            glommio::timer::sleep(Duration::from_nanos(backoff.next_delay_ns())).await;
        }
    }

    fn addr_of(&self, peer: u64) -> Option<SocketAddr> {
        let core = self.core.borrow();
        core.state
            .nodes
            .get(&peer)
            .map(|n| n.addr.clone())
            .or_else(|| core.known_addrs.get(&peer).cloned())
            .and_then(|a| a.parse().ok())
    }

    async fn read_loop(self: Rc<Self>, peer: u64, session: Session) {
        // A Raft message arriving in parts: the parts so far.
        let mut assembly = Assembly::default();
        let mut malformed_leases: u64 = 0;
        while let Some((kind, body)) = session.recv_wait().await {
            if self.isolated() {
                continue;
            }
            let mut core = self.core.borrow_mut();
            core.heard.insert(peer, Instant::now());
            match kind {
                RAFT_KIND => self.step_raft(&mut core, peer, &body),
                RAFT_PART_KIND => match assembly.take(&body) {
                    Ok(Some(whole)) => self.step_raft(&mut core, peer, &whole),
                    Ok(None) => {}
                    Err(why) => eprintln!(
                        "dirigo node {}: a consensus message in parts from node {peer}: {why}; dropped",
                        self.id
                    ),
                },
                LEASE_REQUEST_KIND
                    if core.state.nodes.get(&peer).is_some_and(|n| !n.retired) =>
                {
                    let Some((seq, report)) = load::decode_request(&body) else {
                        // The first, then one in a hundred.
                        if malformed_leases.is_multiple_of(100) {
                            eprintln!(
                                "dirigo node {}: a malformed lease request from node {peer} ({} bytes); ignored ({} so far)",
                                self.id,
                                body.len(),
                                malformed_leases + 1
                            );
                        }
                        malformed_leases += 1;
                        continue;
                    };
                    let now = Instant::now();
                    if report.cores > 0 {
                        core.cores.insert(peer, report.cores);
                    }
                    if core.raft.raft.state == StateRole::Leader {
                        core.reports.insert(peer, (report, now));
                    }
                    let left = self
                        .leader_lease_until(&core, now)
                        .and_then(|until| lease::grant(until, now));
                    if let Some(left) = left {
                        let mut grant = seq.to_le_bytes().to_vec();
                        grant.extend_from_slice(&(left.as_micros() as u64).to_le_bytes());
                        let commit = core.raft.raft.raft_log.committed;
                        grant.extend_from_slice(&commit.to_le_bytes());
                        drop(core);
                        let _ = session.send(LEASE_GRANT_KIND, grant);
                        self.handle_ready();
                        continue;
                    }
                }
                // A follower echoes its leader's probes only: one that moved
                // on to another leader (or none yet) no longer vouches.
                LEASE_PROBE_KIND
                    if body.len() == 8
                        && core.raft.raft.leader_id == peer
                        && core.raft.raft.state != StateRole::Leader =>
                {
                    drop(core);
                    let _ = session.send(LEASE_ECHO_KIND, body);
                    continue;
                }
                LEASE_ECHO_KIND
                    if body.len() == 8 && core.raft.raft.state == StateRole::Leader =>
                {
                    let seq = u64::from_le_bytes(body[..8].try_into().unwrap());
                    core.acks.on_echo(peer, seq);
                }
                LEASE_GRANT_KIND if body.len() == 24 => {
                    let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
                    let (seq, valid, commit) = (word(0), Duration::from_micros(word(8)), word(16));
                    if core.raft.raft.leader_id == peer && core.raft.raft.state != StateRole::Leader
                    {
                        core.lease.on_grant(seq, valid, commit);
                    }
                }
                _ => {}
            }
            drop(core);
            self.handle_ready();
        }
    }

    fn step_raft(&self, core: &mut Core, peer: u64, bytes: &[u8]) {
        let mut message = Message::default();
        if message.merge_from_bytes(bytes).is_err() || message.from != peer {
            eprintln!(
                "dirigo node {}: a malformed message from node {peer}",
                self.id
            );
            return;
        }
        let _ = core.raft.step(message);
    }

    /// The leader's own lease: `LEASE` past the time it last heard from a
    /// majority of the voters, itself included. None on a follower.
    fn leader_lease_until(&self, core: &Core, now: Instant) -> Option<Instant> {
        if core.raft.raft.state != StateRole::Leader || !core.voters.contains(&self.id) {
            return None;
        }
        // Not before it has applied an entry of its own term (its first,
        // empty one): before that it may not know every placement made.
        let raft = &core.raft.raft;
        if raft.raft_log.term(core.applied).ok() != Some(raft.term) {
            return None;
        }
        lease::leader_until(self.id, &core.voters, |v| core.acks.acked(v), now)
    }

    fn has_lease(&self, core: &Core, now: Instant) -> bool {
        if core.state.nodes.get(&self.id).is_some_and(|n| n.retired) {
            return false;
        }
        if core.raft.raft.state == StateRole::Leader {
            return self
                .leader_lease_until(core, now)
                .is_some_and(|until| until > now);
        }
        core.lease.holds(now, core.applied)
    }

    fn isolated(&self) -> bool {
        let Some(path) = &self.isolate_file else {
            return false;
        };
        let mut core = self.core.borrow_mut();
        let now = Instant::now();
        if core
            .isolated_checked
            .is_none_or(|at| now.duration_since(at) >= Duration::from_millis(10))
        {
            let isolated = path.exists();
            if isolated != core.isolated {
                eprintln!(
                    "dirigo node {}: {} (test hook)",
                    self.id,
                    if isolated {
                        "isolated"
                    } else {
                        "isolation over"
                    }
                );
            }
            core.isolated = isolated;
            core.isolated_checked = Some(now);
        }
        core.isolated
    }

    /// Queue a message to a peer; whether it was taken.
    fn send_peer(self: &Rc<Self>, peer: u64, kind: u8, body: Vec<u8>) -> bool {
        if peer == self.id || self.isolated() {
            return false;
        }
        // A full send buffer drops the message: Raft sends again. One too
        // large for a frame would be dropped every time: said, not hidden
        // (the bounds above keep it from happening).
        match self.session(peer).send(kind, body) {
            Ok(_) => true,
            Err(SendError::TooLarge { body_bytes, max }) => {
                eprintln!(
                    "dirigo node {}: a message of kind {kind} to node {peer} is {body_bytes} bytes, \
                     over the {max} a frame takes; dropped",
                    self.id
                );
                false
            }
            Err(_) => false,
        }
    }

    /// Persist, send and apply what Raft has ready, until it has nothing;
    /// then compact the log if it is due.
    fn handle_ready(self: &Rc<Self>) {
        loop {
            let mut core = self.core.borrow_mut();
            if !core.raft.has_ready() {
                drop(core);
                self.maybe_compact();
                return;
            }
            let mut ready = core.raft.ready();
            let mut outgoing = ready.take_messages();
            let committed = ready.take_committed_entries();
            let store = core.raft.raft.raft_log.store.clone();
            if !ready.snapshot().is_empty() {
                self.install_snapshot(&mut core, ready.snapshot().clone());
            }
            if !ready.entries().is_empty() {
                for entry in ready.entries() {
                    let bytes = entry.write_to_bytes().expect("entries encode");
                    if let Err(e) = core.log.append_entry(entry.index, &bytes) {
                        self.fail(&format!("appending to the consensus log: {e}"));
                    }
                }
                store
                    .mem
                    .wl()
                    .append(ready.entries())
                    .expect("entries follow the log");
            }
            if let Some(hs) = ready.hs() {
                let bytes = hs.write_to_bytes().expect("hard state encodes");
                if let Err(e) = core.log.set_hard_state(&bytes) {
                    self.fail(&format!("writing the consensus log: {e}"));
                }
                store.mem.wl().set_hardstate(hs.clone());
            }
            // Durable before any message that promises it goes out.
            if !ready.entries().is_empty() || ready.hs().is_some() {
                if let Err(e) = core.log.sync() {
                    self.fail(&format!("syncing the consensus log: {e}"));
                }
            }
            outgoing.extend(ready.take_persisted_messages());
            let mut light = core.raft.advance(ready);
            if let Some(commit) = light.commit_index() {
                store.mem.wl().mut_hard_state().set_commit(commit);
            }
            outgoing.extend(light.take_messages());
            let mut committed = committed;
            committed.extend(light.take_committed_entries());
            drop(core);
            let mut snapshots_sent = Vec::new();
            for message in outgoing {
                let bytes = message.write_to_bytes().expect("messages encode");
                let sent = self.send_raft(message.to, bytes);
                if message.get_msg_type() == MessageType::MsgSnapshot {
                    snapshots_sent.push((message.to, sent));
                }
            }
            self.apply(committed);
            let mut core = self.core.borrow_mut();
            core.raft.advance_apply();
            // The link delivers what it took, in order, unless the peer
            // restarts (then it asks again): a snapshot queued counts as
            // sent, one refused as failed, and Raft tries again.
            for (to, sent) in snapshots_sent {
                let status = if sent {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                core.raft.report_snapshot(to, status);
            }
        }
    }

    /// Send one Raft message, in parts if it is larger than a frame (a
    /// snapshot); whether every part was queued.
    fn send_raft(self: &Rc<Self>, peer: u64, bytes: Vec<u8>) -> bool {
        if peer == self.id || self.isolated() {
            return false;
        }
        let session = self.session(peer);
        if bytes.len() <= session.body_bytes_max() {
            return self.send_peer(peer, RAFT_KIND, bytes);
        }
        if bytes.len() > RAFT_ASSEMBLED_BYTES_MAX {
            eprintln!(
                "dirigo node {}: a consensus message to node {peer} is {} bytes, over the {} \
                 a node takes; dropped",
                self.id,
                bytes.len(),
                RAFT_ASSEMBLED_BYTES_MAX
            );
            return false;
        }
        let parts = bytes.len().div_ceil(RAFT_PART_BYTES);
        for (part, chunk) in bytes.chunks(RAFT_PART_BYTES).enumerate() {
            let mut body = Vec::with_capacity(8 + chunk.len());
            body.extend_from_slice(&(part as u32).to_le_bytes());
            body.extend_from_slice(&(parts as u32).to_le_bytes());
            body.extend_from_slice(chunk);
            if !self.send_peer(peer, RAFT_PART_KIND, body) {
                return false;
            }
        }
        true
    }

    /// A snapshot from the leader: this node was too far behind for the
    /// entries the leader keeps. It replaces the log and the state.
    fn install_snapshot(&self, core: &mut Core, snapshot: Snapshot) {
        let index = snapshot.get_metadata().index;
        let state: ClusterState = match serde_json::from_slice(&snapshot.data) {
            Ok(state) => state,
            Err(e) => self.fail(&format!(
                "the leader's snapshot at {index} holds no state: {e}"
            )),
        };
        let store = core.raft.raft.raft_log.store.clone();
        if let Err(e) = store.mem.wl().apply_snapshot(snapshot.clone()) {
            self.fail(&format!("installing the leader's snapshot at {index}: {e}"));
        }
        let cs = snapshot.get_metadata().get_conf_state().clone();
        let hs = store.mem.rl().hard_state().clone();
        let written = core.log.rewrite(
            (index, &snapshot.write_to_bytes().expect("snapshots encode")),
            &cs.write_to_bytes().expect("membership encodes"),
            &hs.write_to_bytes().expect("hard state encodes"),
            &[],
        );
        if let Err(e) = written {
            self.fail(&format!("writing the leader's snapshot at {index}: {e}"));
        }
        eprintln!(
            "dirigo node {}: installed the leader's snapshot through entry {index} ({} bytes of state)",
            self.id,
            snapshot.data.len()
        );
        core.state = state;
        note_leaving(core, self.id, index);
        core.applied = index;
        core.compacted = index;
        core.voters = cs.voters.clone();
        core.learners = cs.learners.clone();
        *store.snapshot.borrow_mut() = snapshot;
    }

    /// Once `compact_every` entries were applied past the last snapshot
    /// (or the membership changed), take a snapshot of the state: the log
    /// file is rewritten whole, atomically, with the snapshot and the
    /// entries after it; memory keeps `KEEP_BEHIND` entries more. This
    /// holds the node's thread for the time it takes to write (and fsync)
    /// the state, which its bounds keep small.
    fn maybe_compact(&self) {
        let mut core = self.core.borrow_mut();
        let index = core.applied;
        let due = index >= core.compacted + core.compact_every
            || (core.membership_changed && index > core.compacted);
        if !due {
            return;
        }
        let store = core.raft.raft.raft_log.store.clone();
        let Ok(term) = store.mem.term(index) else {
            return;
        };
        let Ok(RaftState {
            hard_state,
            conf_state,
        }) = store.mem.initial_state()
        else {
            return;
        };
        let Ok(last) = store.mem.last_index() else {
            return;
        };
        let later =
            match store
                .mem
                .entries(index + 1, last + 1, None, GetEntriesContext::empty(false))
            {
                Ok(later) => later,
                Err(_) => return,
            };
        let mut snapshot = Snapshot {
            data: serde_json::to_vec(&core.state)
                .expect("the state serializes")
                .into(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(conf_state.clone());
        let encoded: Vec<Vec<u8>> = later
            .iter()
            .map(|e| e.write_to_bytes().expect("entries encode"))
            .collect();
        let entries: Vec<(u64, &[u8])> = later
            .iter()
            .zip(&encoded)
            .map(|(e, bytes)| (e.index, &bytes[..]))
            .collect();
        let written = core.log.rewrite(
            (index, &snapshot.write_to_bytes().expect("snapshots encode")),
            &conf_state.write_to_bytes().expect("membership encodes"),
            &hard_state.write_to_bytes().expect("hard state encodes"),
            &entries,
        );
        if let Err(e) = written {
            self.fail(&format!("compacting the consensus log: {e}"));
        }
        // In memory, `KEEP_BEHIND` entries up to the snapshot stay too: a
        // follower a little behind (as most are right after a membership
        // change) gets entries, not the whole snapshot.
        store
            .mem
            .wl()
            .compact(index.saturating_sub(KEEP_BEHIND) + 1)
            .expect("compacting within the log");
        eprintln!(
            "dirigo node {}: compacted the consensus log through entry {index} ({} bytes of state, {} entries after it)",
            self.id,
            snapshot.data.len(),
            later.len()
        );
        *store.snapshot.borrow_mut() = snapshot;
        core.compacted = index;
        core.membership_changed = false;
    }

    /// A node leaving, which heard from no member for `LEFT_AFTER`, asks
    /// the others for their status: one that applied this node's `Retire`
    /// and no longer lists it confirms its removal, and it goes. Otherwise
    /// it stays (its vote may still be needed to agree on its removal) and
    /// asks again later.
    async fn confirm_removal(self: Rc<Self>) {
        // Spawned from `lead`, which holds the core: begin once it is done.
        futures_lite::future::yield_now().await;
        let client = self.client_identity();
        let peers = self.other_members(&self.core.borrow());
        for (peer, to) in peers {
            let Ok(Reply::Status { status }) =
                client::request_on_executor(to, &client, &Request::Status).await
            else {
                continue;
            };
            // Only a node that applied this node's `Retire` can tell: one
            // behind it (joining, restarted on an old log) may not list
            // this node for want of knowing it.
            let retired_index = self.core.borrow().retired_index;
            if retired_index == 0 || status["applied"].as_u64().unwrap_or(0) < retired_index {
                continue;
            }
            let listed = status["nodes"]
                .as_array()
                .is_some_and(|nodes| nodes.iter().any(|n| n["id"] == self.id));
            if !listed {
                let why = format!(
                    "its removal agreed, as node {peer} says; to join again, start a node on an empty data directory"
                );
                self.leave(&mut self.core.borrow_mut(), &why);
            }
        }
        // Not confirmed: it stays (leaseless, running nothing), since its
        // vote may still be needed to agree on its removal, and asks again.
        let mut core = self.core.borrow_mut();
        core.confirming = false;
        // Ask again `LEFT_AFTER` from now if nothing is heard meanwhile.
        core.removal_asked = Some(Instant::now());
    }

    /// This node left the cluster: its runs are stopped (they ran on no
    /// lease already) and it exits.
    fn leave(&self, core: &mut Core, why: &str) -> ! {
        for mut run in core.runs.drain(..) {
            run.kill();
            run.reap();
        }
        eprintln!(
            "dirigo node {}: left the cluster ({why}); stopping",
            self.id
        );
        if let Err(e) =
            dirigo_storage::manifest::commit_atomic(&self.data_dir, REMOVED_FILE, why.as_bytes())
        {
            eprintln!(
                "dirigo node {}: writing {}: {e} (do not start a node on this directory again)",
                self.id,
                self.data_dir.join(REMOVED_FILE).display()
            );
        }
        std::process::exit(0);
    }

    /// An I/O failure of the consensus log: a node that cannot keep its
    /// promises must not make more. It exits; its runs die with it.
    fn fail(&self, error: &str) -> ! {
        eprintln!("dirigo node {}: {error}; stopping", self.id);
        std::process::exit(1);
    }

    fn apply(self: &Rc<Self>, entries: Vec<Entry>) {
        for entry in entries {
            let mut core = self.core.borrow_mut();
            core.applied = entry.index;
            if entry.data.is_empty() {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryConfChange => {
                    let mut change = ConfChange::default();
                    if change.merge_from_bytes(&entry.data).is_err() {
                        continue;
                    }
                    let Ok(cs) = core.raft.apply_conf_change(&change) else {
                        continue;
                    };
                    let bytes = cs.write_to_bytes().expect("membership encodes");
                    if let Err(e) = core
                        .log
                        .set_membership(&bytes)
                        .and_then(|_| core.log.sync())
                    {
                        self.fail(&format!("writing the consensus log: {e}"));
                    }
                    core.voters = cs.voters.clone();
                    core.learners = cs.learners.clone();
                    core.raft.raft.raft_log.store.mem.wl().set_conf_state(cs);
                    core.membership_changed = true;
                    let node = change.node_id;
                    match change.get_change_type() {
                        // A node joins as a learner (it takes the log and
                        // does not vote), with its address.
                        ConfChangeType::AddLearnerNode => {
                            let addr = String::from_utf8_lossy(&change.context).into_owned();
                            eprintln!("dirigo node {}: node {node} joined at {addr}", self.id);
                            core.state.add_node(node, addr);
                        }
                        // It votes once it has caught up (the first node:
                        // from the start, saying its address here).
                        ConfChangeType::AddNode => {
                            if !change.context.is_empty() {
                                let addr = String::from_utf8_lossy(&change.context).into_owned();
                                eprintln!("dirigo node {}: node {node} joined at {addr}", self.id);
                                core.state.add_node(node, addr);
                            }
                            eprintln!("dirigo node {}: node {node} votes", self.id);
                            // A new voter counts as heard from when it is
                            // added (the leader's lease must not lapse before
                            // it speaks).
                            core.heard.entry(node).or_insert_with(Instant::now);
                            // Only the leader that added it, just now: one
                            // that applies an older term's add knows
                            // nothing of the voter's recent echoes.
                            if entry.term == core.raft.raft.term {
                                core.acks.assume(node, Instant::now());
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            eprintln!("dirigo node {}: node {node} left the cluster", self.id);
                            core.state.remove_node(node);
                            core.retired_at.remove(&node);
                            core.known_addrs.remove(&node);
                            core.heard.remove(&node);
                            if node == self.id {
                                self.leave(
                                    &mut core,
                                    "its removal applied; to join again, start a node on an empty data directory",
                                );
                            }
                            if let Some(session) = self.peers.borrow_mut().remove(&node) {
                                session.stop();
                            }
                        }
                    }
                }
                EntryType::EntryNormal => {
                    let Ok(command) = serde_json::from_slice::<Command>(&entry.data) else {
                        eprintln!("dirigo node {}: a malformed command in the log", self.id);
                        continue;
                    };
                    if let Command::Liveness { node, alive } = &command {
                        eprintln!(
                            "dirigo node {}: node {node} is {}",
                            self.id,
                            if *alive { "alive" } else { "lost" }
                        );
                    }
                    if let Command::Assign {
                        job,
                        node,
                        epoch,
                        peers,
                        ..
                    } = &command
                    {
                        core.proposed.remove(job);
                        eprintln!(
                            "dirigo node {}: {job} placed on node {node}{} (epoch {epoch})",
                            self.id,
                            and_peers(peers)
                        );
                    }
                    if let Command::Move { job, to, peers, .. } = &command {
                        // A failover's key: what is placed next may need
                        // placing again soon (a target lost meanwhile).
                        core.proposed.remove(job);
                        eprintln!(
                            "dirigo node {}: {job} to move to node {to}{}",
                            self.id,
                            and_peers(peers)
                        );
                    }
                    if let Some((request, answer)) = core.state.apply(command) {
                        // The state took a `Retire`: the node's leaving
                        // counts from now.
                        if let Answer::Retired(node) = answer {
                            eprintln!("dirigo node {}: node {node} is leaving", self.id);
                            core.retired_at.insert(node, Instant::now());
                            if node == self.id {
                                core.retired_index = entry.index;
                            }
                        }
                        if let Some(waiter) = core.waiting.remove(&request) {
                            let _ = waiter.try_send(answer);
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {}
            }
        }
    }

    fn propose(&self, core: &mut Core, command: &Command) -> Result<(), String> {
        let data = encode_command(command)?;
        core.raft
            .propose(Vec::new(), data)
            .map_err(|e| format!("no leader takes the proposal ({e}): the cluster has no majority"))
    }

    /// Log, once per `PROPOSE_AGAIN_AFTER`, that job `name` waits for `k`
    /// free ports of `--run-ports`.
    fn note_no_ports(
        &self,
        proposed: &mut HashMap<String, Instant>,
        name: &str,
        k: usize,
        now: Instant,
    ) {
        let key = format!("no ports {name}");
        if let std::collections::hash_map::Entry::Vacant(entry) = proposed.entry(key) {
            eprintln!(
                "dirigo node {}: {name} waits for {k} free ports of --run-ports {}-{}",
                self.id, self.run_ports.first, self.run_ports.last
            );
            entry.insert(now);
        }
    }

    async fn tick_loop(self: Rc<Self>) {
        let mut next = Instant::now();
        loop {
            next += TICK;
            let now = Instant::now();
            if next > now {
                glommio::timer::sleep(next - now).await;
            } else {
                next = now;
            }
            self.core.borrow_mut().raft.tick();
            self.handle_ready();
            {
                let mut core = self.core.borrow_mut();
                let core = &mut *core;
                note_finished(&core.state, &mut core.finished_seen, Instant::now());
            }
            self.ask_lease();
            self.probe_voters();
            self.lead();
            self.supervise();
            self.handle_ready();
        }
    }

    /// A follower asks the leader for its lease.
    /// The leader: probe every voter, every `ASK_EVERY` (its own lease
    /// counts their echoes).
    fn probe_voters(self: &Rc<Self>) {
        let mut core = self.core.borrow_mut();
        if core.raft.raft.state != StateRole::Leader {
            return;
        }
        let Some(seq) = core.acks.probe(Instant::now()) else {
            return;
        };
        let voters: Vec<u64> = core
            .voters
            .iter()
            .copied()
            .filter(|v| *v != self.id)
            .collect();
        drop(core);
        for voter in voters {
            self.send_peer(voter, LEASE_PROBE_KIND, seq.to_le_bytes().to_vec());
        }
    }

    fn ask_lease(self: &Rc<Self>) {
        let now = Instant::now();
        let mut core = self.core.borrow_mut();
        let leader = core.raft.raft.leader_id;
        if leader == 0 || leader == self.id {
            return;
        }
        let Some(seq) = core.lease.ask(now) else {
            return;
        };
        let by_number = |figures: BTreeMap<String, u32>| -> BTreeMap<u64, u32> {
            figures
                .into_iter()
                .map(|(job, figure)| (submission_number(&job), figure))
                .collect()
        };
        let report = Report {
            cores: own_cores(),
            parts: by_number(core.meter.parts()),
            latency: by_number(own_latency(&core.runs, now)),
        };
        drop(core);
        self.send_peer(
            leader,
            LEASE_REQUEST_KIND,
            load::encode_request(seq, &report),
        );
    }

    /// Every member: say its address if it moved. The leader: say who is
    /// alive, and place the jobs that have no live node.
    fn lead(self: &Rc<Self>) {
        let now = Instant::now();
        let mut core = self.core.borrow_mut();
        let core = &mut *core;
        // What is older no longer holds a proposal back.
        core.proposed
            .retain(|_, at| now.duration_since(*at) < PROPOSE_AGAIN_AFTER);
        if core.voters.contains(&self.id) {
            let addr = self.listen.to_string();
            let mine = core.state.nodes.get(&self.id).map(|n| n.addr.as_str());
            if mine.is_some_and(|mine| mine != addr) && core.raft.raft.leader_id != 0 {
                let key = "addr".to_string();
                if !proposed_lately(&core.proposed, &key, now) {
                    core.proposed.insert(key, now);
                    let _ = self.propose(
                        core,
                        &Command::SetAddr {
                            node: self.id,
                            addr,
                            request: 0,
                        },
                    );
                }
            }
        }
        // A node leaving that heard from no other for `LEFT_AFTER` was
        // most likely removed: the leader no longer speaks to a node it
        // removed, and the entry saying so may not have reached it. It
        // asks the others (`confirm_removal`).
        if let Some(&at) = core.retired_at.get(&self.id) {
            let last = core
                .heard
                .values()
                .copied()
                .chain(core.removal_asked)
                .max()
                .unwrap_or(at)
                .max(at);
            if now.duration_since(last) >= LEFT_AFTER && !core.confirming {
                core.confirming = true;
                glommio::spawn_local(self.clone().confirm_removal()).detach();
            }
        }
        if core.raft.raft.state != StateRole::Leader {
            core.leader_since = None;
            core.acks.reset();
            // What it watched as leader does not count toward a later reign.
            core.watch = Watch::default();
            return;
        }
        // A leader leaving hands the lead to a staying voter (it holds no
        // lease, and runs nothing; someone else must). With none to take
        // it (a learner still catching up, the others lost), it leads on:
        // it promotes learners and moves jobs, but never removes itself.
        let leaving = core.state.nodes.get(&self.id).is_some_and(|n| n.retired);
        if leaving {
            let heir = core
                .voters
                .iter()
                .copied()
                .filter(|v| *v != self.id)
                .filter(|v| {
                    core.state
                        .nodes
                        .get(v)
                        .is_some_and(|n| n.alive && !n.retired)
                })
                // Heard lately: the state's `alive` is not kept while the
                // leader hands over (and a dead heir would never take it).
                .filter(|v| {
                    core.heard
                        .get(v)
                        .is_some_and(|at| now.duration_since(*at) < LOST_AFTER)
                })
                .max_by_key(|v| {
                    (
                        core.raft.raft.prs().get(*v).map_or(0, |p| p.matched),
                        std::cmp::Reverse(*v),
                    )
                });
            if let Some(heir) = heir {
                let key = "transfer".to_string();
                if !proposed_lately(&core.proposed, &key, now) {
                    core.proposed.insert(key, now);
                    eprintln!(
                        "dirigo node {}: leaving; handing the lead to node {heir}",
                        self.id
                    );
                    core.raft.transfer_leader(heir);
                }
                return;
            }
        }
        let since = *core.leader_since.get_or_insert(now);
        // Decide nothing on a state that may lack entries of earlier terms:
        // not before an entry of this term (its first, empty one) is applied.
        let raft = &core.raft.raft;
        if raft.raft_log.term(core.applied).ok() != Some(raft.term) {
            return;
        }
        // A learner that has caught up with the commit index votes; one
        // change at a time (Raft takes no second while one is pending).
        let committed = raft.raft_log.committed;
        let caught_up = core
            .learners
            .iter()
            .copied()
            .filter(|id| core.state.nodes.get(id).is_none_or(|n| !n.retired))
            .find(|id| raft.prs().get(*id).is_some_and(|p| p.matched >= committed));
        if let Some(id) = caught_up.filter(|_| !raft.has_pending_conf()) {
            let mut change = ConfChange::default();
            change.set_change_type(ConfChangeType::AddNode);
            change.node_id = id;
            let _ = core.raft.propose_conf_change(Vec::new(), change);
        }
        // The first node is a member from the start, by its own initial
        // membership, which no entry says: it adds itself through the log,
        // where the nodes that join later read it.
        if !core.state.nodes.contains_key(&self.id) {
            let key = "member".to_string();
            if !proposed_lately(&core.proposed, &key, now) {
                core.proposed.insert(key, now);
                let mut change = ConfChange::default();
                change.set_change_type(ConfChangeType::AddNode);
                change.node_id = self.id;
                change.context = self.listen.to_string().into_bytes().into();
                let _ = core.raft.propose_conf_change(Vec::new(), change);
            }
        }
        let mut commands = Vec::new();
        for (id, info) in &core.state.nodes {
            // Lost: nothing for LOST_AFTER, this reign's start counting as
            // heard. Back: heard within LOST_AFTER, in this reign (a new
            // leader does not call a node alive for want of time to miss it).
            let heard = core.heard.get(id).copied();
            let alive = if *id == self.id && !info.retired {
                true
            } else if info.retired {
                // Leaving: it is granted no lease from the time this node
                // applied that (or this reign began), so its last lease has
                // surely ended `LOST_AFTER` later; then its jobs move.
                let from = core.retired_at.get(id).map_or(since, |at| (*at).max(since));
                info.alive && now.duration_since(from) < LOST_AFTER
            } else if info.alive {
                now.duration_since(heard.map_or(since, |h| h.max(since))) < LOST_AFTER
            } else {
                heard.is_some_and(|h| h >= since && now.duration_since(h) < LOST_AFTER)
            };
            if alive != info.alive {
                commands.push((
                    format!("liveness {id}"),
                    Command::Liveness { node: *id, alive },
                ));
            }
        }
        // Place what has no placement, or a lost node in it, spreading the
        // parts by load (the CPU of each live node's parts, `load_of`).
        let live = core.state.nodes.iter().filter(|(id, info)| {
            info.alive
                && !info.retired
                && !commands.iter().any(
                    |(_, c)| matches!(c, Command::Liveness { node, alive: false } if node == *id),
                )
        });
        core.reports
            .retain(|_, (_, at)| now.duration_since(*at) < load::REPORT_FRESH);
        core.load_moved
            .retain(|_, at| now.duration_since(*at) < load::LOAD_MOVE_QUIET);
        let cpu = cpu_view(self.id, &core.state, core.meter.parts(), &core.reports);
        let own = own_latency(&core.runs, now);
        let latency = latency_view(self.id, &core.state, own, &core.reports);
        let mut load = load_of(&core.state, live.map(|(id, _)| *id), &cpu);
        let mut in_use = ports_in_use(&core.state, &core.finished_seen, now);
        // Ports of placements proposed but not yet applied are taken too.
        core.promised
            .retain(|_, (at, _)| now.duration_since(*at) < PROPOSE_AGAIN_AFTER);
        for (_, ports) in core.promised.values() {
            in_use.extend(ports);
        }
        let mut placing = false;
        for (name, epoch, none_alive) in core.state.unplaced() {
            // Proposed already: not placed again before it is answered.
            if proposed_lately(&core.proposed, &name, now) {
                placing = true;
                continue;
            }
            if load.is_empty() {
                break;
            }
            let shards = core.state.jobs[&name].shards();
            // None: too few free ports for it; the others may need fewer.
            let Some((node, peers, ports)) = place(
                &mut load,
                shards,
                &mut in_use,
                &mut core.port_cursor,
                self.run_ports,
            ) else {
                let k = state::width(shards, load.len());
                self.note_no_ports(&mut core.proposed, &name, k, now);
                continue;
            };
            placing = true;
            core.promised.insert(name.clone(), (now, ports.clone()));
            let command = if none_alive {
                Command::Assign {
                    job: name.clone(),
                    node,
                    epoch: epoch + 1,
                    peers,
                    ports,
                }
            } else {
                Command::Move {
                    job: name.clone(),
                    epoch,
                    to: node,
                    peers,
                    ports,
                    quick: false,
                    // Placed anew, as wide as it may run.
                    narrowed: false,
                }
            };
            commands.push((name, command));
        }
        let moving = core
            .state
            .jobs
            .values()
            .any(|j| j.state == JobState::Running && j.moving_to.is_some());
        let moving_proposed = proposed_lately(&core.proposed, "move", now);
        let figures = Figures {
            load: &load,
            cpu: &cpu,
            cores: &core.cores,
            latency: &latency,
        };
        core.watch.note(&core.state, &figures, now);
        if !moving && !placing && !moving_proposed {
            let quiet: BTreeSet<String> = core.load_moved.keys().cloned().collect();
            let Answers {
                ripe,
                settled,
                late,
            } = core.watch.answers(self.narrow_after, now);
            let weighing = Weighing {
                f: figures,
                quiet: &quiet,
                ripe: &ripe,
                settled: &settled,
                late: &late,
            };
            if let Some((command, kind, why)) = widen_or_rebalance(
                &core.state,
                &weighing,
                &mut in_use,
                &mut core.port_cursor,
                self.run_ports,
            ) {
                if let Command::Move {
                    job,
                    to,
                    peers,
                    ports,
                    ..
                } = &command
                {
                    eprintln!(
                        "dirigo node {}: moving {job} to node {to}{} ({why})",
                        self.id,
                        and_peers(peers)
                    );
                    core.promised.insert(job.clone(), (now, ports.clone()));
                    // Kept still from the proposal on (one the log refuses
                    // too: the figures that asked for it still hold).
                    if matches!(
                        kind,
                        MoveKind::Load | MoveKind::Narrow | MoveKind::Late | MoveKind::WidenLate
                    ) {
                        core.load_moved.insert(job.clone(), now);
                    }
                    if matches!(kind, MoveKind::Late | MoveKind::WidenLate) {
                        core.watch.late_answered.insert(job.clone(), now);
                    }
                }
                commands.push(("move".to_string(), command));
            }
        }
        // A node leaving, declared not alive, with no job left on it: out of
        // the membership (one change at a time).
        let gone = core
            .state
            .nodes
            .iter()
            .filter(|(id, info)| info.retired && !info.alive && **id != self.id)
            .map(|(id, _)| *id)
            .find(|id| {
                !core
                    .state
                    .jobs
                    .values()
                    .any(|j| j.state == JobState::Running && j.runs_on(*id))
            });
        if let Some(node) = gone {
            let key = format!("remove {node}");
            if !core.raft.raft.has_pending_conf() && !proposed_lately(&core.proposed, &key, now) {
                core.proposed.insert(key, now);
                let mut change = ConfChange::default();
                change.set_change_type(ConfChangeType::RemoveNode);
                change.node_id = node;
                let _ = core.raft.propose_conf_change(Vec::new(), change);
            }
        }
        for (key, command) in commands {
            if proposed_lately(&core.proposed, &key, now) {
                continue;
            }
            core.proposed.insert(key, now);
            let _ = self.propose(core, &command);
        }
    }

    /// Start the runs of the jobs placed here, stop those that must not run,
    /// and report runs that ended.
    fn supervise(self: &Rc<Self>) {
        let now = Instant::now();
        let mut core = self.core.borrow_mut();
        let core = &mut *core;
        let runs = core.runs.iter().map(|r| (r.job.as_str(), r.epoch, r.pid()));
        core.meter.sample(runs, now);
        let leased = self.has_lease(core, now);
        // Kill every run that must stop before waiting for any.
        let mut stopping = Vec::new();
        let mut i = 0;
        while i < core.runs.len() {
            let run = &core.runs[i];
            // A part other than 0 of a job that finished (part 0 reported
            // the end) is left `PART_GRACE` to end by itself, with its
            // summary.
            let grace =
                run.part > 0
                    && core.state.jobs.get(&run.job).is_some_and(|job| {
                        job.state == JobState::Finished && job.epoch == run.epoch
                    })
                    && core
                        .finished_seen
                        .get(&run.job)
                        .is_some_and(|at| now.duration_since(*at) < PART_GRACE);
            let keep = leased
                && (grace
                    || core.state.jobs.get(&run.job).is_some_and(|job| {
                        job.state == JobState::Running
                            && job.runs_on(self.id)
                            && job.epoch == run.epoch
                            && job.moving_to.is_none()
                    }));
            if !keep {
                let mut run = core.runs.swap_remove(i);
                // One that just ended by itself keeps its outcome.
                if let Some(end) = run.try_end() {
                    note_end(core, &run, end, now);
                    continue;
                }
                run.kill();
                stopping.push(run);
                continue;
            }
            i += 1;
        }
        for run in stopping {
            let (job, epoch, pid) = (run.job.clone(), run.epoch, run.pid());
            run.reap();
            eprintln!(
                "dirigo node {}: activation {job} epoch {epoch} pid {pid} stopped at {} ({})",
                self.id,
                monotonic_ns(),
                if leased {
                    "moved or cancelled"
                } else {
                    "no lease"
                }
            );
        }
        let mut i = 0;
        while i < core.runs.len() {
            if let Some(end) = core.runs[i].try_end() {
                let run = core.runs.swap_remove(i);
                eprintln!(
                    "dirigo node {}: activation {} epoch {} pid {} ended at {}: {end:?}",
                    self.id,
                    run.job,
                    run.epoch,
                    run.pid(),
                    monotonic_ns()
                );
                note_end(core, &run, end, now);
                continue;
            }
            i += 1;
        }
        // What no longer stands is forgotten.
        let state = &core.state;
        let current = |(job, epoch): &(String, u64)| {
            state
                .jobs
                .get(job)
                .is_some_and(|j| j.state == JobState::Running && j.epoch == *epoch)
        };
        // A finished part's summary is kept until the log has it (the job
        // may have finished meanwhile).
        let me = self.id;
        core.parts_done.retain(|(job, epoch), report| {
            let Some(j) = state.jobs.get(job) else {
                return false;
            };
            let unreported = report.is_some()
                && j.state == JobState::Finished
                && !j.part_reports.contains_key(&me);
            j.epoch == *epoch && (j.state == JobState::Running || unreported)
        });
        // Records of starts of jobs that ended go (those of jobs this node
        // does not know yet stay).
        let over: Vec<u64> = state
            .jobs
            .values()
            .filter(|j| j.state != JobState::Running)
            .map(|j| submission_number(&j.name))
            .filter(|n| core.started.contains_key(n))
            .collect();
        for number in over {
            let path = self.data_dir.join(STARTED_DIR).join(number.to_string());
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    core.started.remove(&number);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    core.started.remove(&number);
                }
                Err(e) => eprintln!("dirigo node {}: {}: {e}", self.id, path.display()),
            }
        }
        core.peer_lost.retain(|key, _| current(key));
        // Report ended runs until the log has them.
        let ended: Vec<((String, u64), Outcome)> = core
            .ended
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((job, epoch), outcome) in ended {
            let current = core
                .state
                .jobs
                .get(&job)
                .is_some_and(|j| j.state == JobState::Running && j.epoch == epoch);
            if !current {
                core.ended.remove(&(job, epoch));
                continue;
            }
            let key = format!("ended {job}");
            if proposed_lately(&core.proposed, &key, now) {
                continue;
            }
            core.proposed.insert(key, now);
            let _ = self.propose(
                core,
                &Command::Ended {
                    job,
                    epoch,
                    outcome,
                },
            );
        }
        // Finished parts' summaries, until the log has them.
        let parts: Vec<((String, u64), serde_json::Value)> = core
            .parts_done
            .iter()
            .filter_map(|(key, report)| Some((key.clone(), part_summary(report.as_ref()?))))
            .filter(|((job, _), _)| {
                core.state
                    .jobs
                    .get(job)
                    .is_some_and(|j| !j.part_reports.contains_key(&me))
            })
            .collect();
        for ((job, epoch), report) in parts {
            let key = format!("part ended {job}");
            if proposed_lately(&core.proposed, &key, now) {
                continue;
            }
            core.proposed.insert(key, now);
            let command = Command::PartEnded {
                job,
                epoch,
                node: me,
                report,
            };
            let _ = self.propose(core, &command);
        }
        // A part that lost a peer: run the placement again, unless the
        // leader moved it meanwhile (or is about to: a node of it is lost
        // or leaving). Past `RESTARTS_MAX` quick losses in a row (a peer
        // that can never connect), the job fails.
        let restarts: Vec<(state::Job, Lost)> = core
            .peer_lost
            .iter()
            .filter(|(_, lost)| now.duration_since(lost.at) >= RESTART_AFTER)
            .filter_map(|((job, _), lost)| Some((core.state.jobs.get(job)?.clone(), lost.clone())))
            .filter(|(job, _)| job.moving_to.is_none())
            .filter(|(job, _)| {
                job.placement().iter().all(|n| {
                    core.state
                        .nodes
                        .get(n)
                        .is_some_and(|info| info.alive && !info.retired)
                })
            })
            .collect();
        for (job, lost) in restarts {
            if lost.quick && job.restarts >= state::RESTARTS_MAX {
                let key = (job.name.clone(), job.epoch);
                core.peer_lost.remove(&key);
                core.ended.insert(
                    key,
                    Outcome::Failed {
                        error: format!(
                            "a part lost a peer soon after it started, or could not listen, \
                             {} times in a row on the same nodes: {}",
                            state::RESTARTS_MAX + 1,
                            lost.why
                        ),
                    },
                );
                continue;
            }
            let key = format!("restart {} {}", job.name, job.epoch);
            if core.proposed.contains_key(&key) {
                continue;
            }
            let ports = if lost.new_ports {
                let mut in_use = ports_in_use(&core.state, &core.finished_seen, now);
                let k = job.ports.len();
                match free_ports(k, &mut in_use, &mut core.port_cursor, self.run_ports) {
                    Some(ports) => ports,
                    None => {
                        // None free now: tried again each tick.
                        self.note_no_ports(&mut core.proposed, &job.name, k, now);
                        continue;
                    }
                }
            } else {
                job.ports.clone()
            };
            let (what, on) = match lost.new_ports {
                true => ("could not listen", format!(" on ports {ports:?}")),
                false => ("lost a peer", String::new()),
            };
            eprintln!(
                "dirigo node {}: {} {what} ({}); running it again{on}",
                self.id, job.name, lost.why
            );
            core.proposed.insert(key, now);
            let _ = self.propose(
                core,
                &Command::Move {
                    job: job.name.clone(),
                    epoch: job.epoch,
                    to: job.node.expect("placed"),
                    peers: job.peers.clone(),
                    ports,
                    quick: lost.quick,
                    narrowed: job.narrowed,
                },
            );
        }
        // Release what moves away once no run of it is left here (a lease
        // is not needed to give a job up).
        let releases: Vec<(String, u64)> = core
            .state
            .jobs
            .values()
            .filter(|job| job.state == JobState::Running && job.runs_on(self.id))
            .filter(|job| job.moving_to.is_some() && !job.released.contains(&self.id))
            .filter(|job| !core.runs.iter().any(|r| r.job == job.name))
            // A run that ended by itself is reported, not released.
            .filter(|job| !core.ended.contains_key(&(job.name.clone(), job.epoch)))
            .map(|job| (job.name.clone(), job.epoch))
            .collect();
        for (job, epoch) in releases {
            let key = format!("released {job} {epoch}");
            if core.proposed.contains_key(&key) {
                continue;
            }
            core.proposed.insert(key, now);
            let _ = self.propose(
                core,
                &Command::Released {
                    job,
                    epoch,
                    node: self.id,
                },
            );
        }
        if !leased {
            return;
        }
        let to_start: Vec<state::Job> = core
            .state
            .jobs
            .values()
            .filter(|job| job.state == JobState::Running && job.runs_on(self.id))
            .filter(|job| job.moving_to.is_none())
            .filter(|job| !core.runs.iter().any(|r| r.job == job.name))
            .filter(|job| {
                let key = (job.name.clone(), job.epoch);
                !core.ended.contains_key(&key)
                    && !core.parts_done.contains_key(&key)
                    && !core.peer_lost.contains_key(&key)
            })
            .cloned()
            .collect();
        for job in to_start {
            let number = submission_number(&job.name);
            let spans = !job.peers.is_empty();
            if spans && core.started.get(&number).is_some_and(|e| *e >= job.epoch) {
                // Started here before, and stopped (a lease lapsed, or this
                // node's process restarted): its peers ran on without it.
                // The placement runs again whole, as the next.
                core.peer_lost.insert(
                    (job.name.clone(), job.epoch),
                    Lost {
                        at: now,
                        why: "this node's part stopped while the others ran".into(),
                        quick: false,
                        new_ports: false,
                    },
                );
                continue;
            }
            if spans {
                if let Err(error) = write_started(&self.data_dir, number, job.epoch) {
                    eprintln!("dirigo node {}: recording a start: {error}", self.id);
                    core.ended
                        .insert((job.name.clone(), job.epoch), Outcome::Failed { error });
                    continue;
                }
                core.started.insert(number, job.epoch);
            }
            let started = monotonic_ns();
            let run = self.part_of(&core.state, &job).and_then(|part| {
                Run::start(&self.program, &job, self.id, part.as_ref(), self.online)
            });
            match run {
                Ok(run) => {
                    eprintln!(
                        "dirigo node {}: activation {} epoch {} pid {} started at {started}",
                        self.id,
                        job.name,
                        job.epoch,
                        run.pid()
                    );
                    core.runs.push(run);
                }
                Err(error) => {
                    core.ended
                        .insert((job.name.clone(), job.epoch), Outcome::Failed { error });
                }
            }
        }
    }

    /// This node's part of `job`'s run over nodes (None: it runs on this
    /// node alone): every part's address, its node's with the part's port.
    fn part_of(&self, state: &ClusterState, job: &state::Job) -> Result<Option<Part>, String> {
        if job.peers.is_empty() {
            return Ok(None);
        }
        let placement = job.placement();
        let me = placement
            .iter()
            .position(|n| *n == self.id)
            .ok_or("not placed here")?;
        let mut addrs = Vec::with_capacity(placement.len());
        for (node, port) in placement.iter().zip(&job.ports) {
            let addr = state
                .nodes
                .get(node)
                .map(|info| info.addr.as_str())
                .ok_or_else(|| format!("node {node} of the placement is no member"))?;
            let mut addr: SocketAddr = addr
                .parse()
                .map_err(|e| format!("node {node}'s address {addr:?}: {e}"))?;
            addr.set_port(*port);
            addrs.push(addr);
        }
        Ok(Some(Part {
            addrs,
            me,
            secret_file: self.secret_file.clone(),
        }))
    }

    /// Answer a client's request.
    async fn answer(self: Rc<Self>, request: Request) -> Reply {
        match request {
            Request::Status => Reply::Status {
                status: self.status_json(),
            },
            Request::Submit { query, args, cwd } => {
                if let Err(message) = crate::cli::check_cluster_job(&query, &args) {
                    return Reply::Error { message };
                }
                if data_dir_of(&args).is_none() {
                    return Reply::Error {
                        message: "a cluster job needs --data-dir".into(),
                    };
                }
                let request = random_u64();
                let command = Command::Submit {
                    request,
                    query,
                    args,
                    cwd,
                };
                let agreed = self
                    .propose_and_wait(request, &command, APPLY_TIMEOUT)
                    .await;
                reply(agreed, |answer| match answer {
                    Answer::Submitted(job) => Some(Reply::Submitted { job }),
                    _ => None,
                })
            }
            Request::Cancel { job } => {
                let request = random_u64();
                let command = Command::Cancel { request, job };
                let agreed = self
                    .propose_and_wait(request, &command, APPLY_TIMEOUT)
                    .await;
                reply(agreed, |answer| match answer {
                    Answer::Cancelled(job) => Some(Reply::Cancelled { job }),
                    _ => None,
                })
            }
            Request::Join { node, addr } => self.admit(node, addr).await,
            Request::Remove { node } => {
                let request = random_u64();
                let command = Command::Retire { request, node };
                let agreed = self
                    .propose_and_wait(request, &command, APPLY_TIMEOUT)
                    .await;
                reply(agreed, |answer| match answer {
                    Answer::Retired(node) => Some(Reply::Removing { node }),
                    _ => None,
                })
            }
            Request::Moved { node, addr } => {
                if node == CLIENT_NODE || addr.parse::<SocketAddr>().is_err() {
                    return Reply::Error {
                        message: format!("node {node} cannot be at {addr:?}"),
                    };
                }
                let request = random_u64();
                let command = Command::SetAddr {
                    node,
                    addr,
                    request,
                };
                // Saying an address again is harmless: the node asks again
                // soon rather than wait out a proposal lost with a leader.
                let agreed = self
                    .propose_and_wait(request, &command, PROPOSE_AGAIN_AFTER)
                    .await;
                reply(agreed, |answer| match answer {
                    Answer::Moved => Some(Reply::Moved),
                    _ => None,
                })
            }
        }
    }

    /// A member restarted on another address than the state has for it:
    /// tell the other members, as a client, until one has it agreed. Until
    /// then the members that dial it (those with lower ids) dial the old
    /// address, and it may hear from nobody.
    async fn announce_loop(self: Rc<Self>) {
        let client = self.client_identity();
        let addr = self.listen.to_string();
        // The state as of what the log had committed when the node
        // started: replayed first.
        let replayed = self.core.borrow().raft.raft.raft_log.committed;
        while self.core.borrow().applied < replayed {
            glommio::timer::sleep(TICK).await;
        }
        loop {
            let peers = {
                let core = self.core.borrow();
                if core
                    .state
                    .nodes
                    .get(&self.id)
                    .is_none_or(|n| n.addr == addr)
                {
                    return;
                }
                self.other_members(&core)
            };
            for (peer, to) in peers {
                let request = Request::Moved {
                    node: self.id,
                    addr: addr.clone(),
                };
                match client::request_on_executor(to, &client, &request).await {
                    Ok(Reply::Moved) => {
                        eprintln!(
                            "dirigo node {}: node {peer} had the cluster agree on this node's new address {addr}",
                            self.id
                        );
                        return;
                    }
                    Ok(other) => eprintln!(
                        "dirigo node {}: telling node {peer} the new address: {other:?}",
                        self.id
                    ),
                    Err(e) => eprintln!(
                        "dirigo node {}: telling node {peer} the new address: {e}",
                        self.id
                    ),
                }
            }
            glommio::timer::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Propose `command` and wait, `timeout` at most, for the answer its
    /// application gives `request`.
    async fn propose_and_wait(
        self: &Rc<Self>,
        request: u64,
        command: &Command,
        timeout: Duration,
    ) -> Result<Answer, String> {
        encode_command(command)?;
        let (sender, receiver) = local_channel::new_bounded(1);
        let mut sender = Some(sender);
        // A node that knows no leader yet (just started, or an election
        // under way) proposes again each tick until one takes it.
        let deadline = Instant::now() + timeout;
        loop {
            let proposed = {
                let mut core = self.core.borrow_mut();
                let proposed = self.propose(&mut core, command);
                if proposed.is_ok() {
                    core.waiting
                        .insert(request, sender.take().expect("proposed once"));
                }
                proposed
            };
            match proposed {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => glommio::timer::sleep(TICK).await,
            }
        }
        self.handle_ready();
        let wait = async {
            receiver
                .recv()
                .await
                .ok_or_else(|| "the node stopped".to_string())
        };
        // One deadline for proposing and waiting, within the client's.
        let timeout = async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            Err(format!(
                "not agreed within {timeout:?} (no leader, or no majority); it may \
                 still be agreed later: see status"
            ))
        };
        let result = futures_lite::future::or(wait, timeout).await;
        self.core.borrow_mut().waiting.remove(&request);
        result
    }

    /// Make `node` a member, then answer with the members' addresses.
    async fn admit(self: Rc<Self>, node: u64, addr: String) -> Reply {
        if node == CLIENT_NODE || addr.parse::<SocketAddr>().is_err() {
            return Reply::Error {
                message: format!("node {node} at {addr:?} cannot join"),
            };
        }
        let deadline = Instant::now() + APPLY_TIMEOUT;
        let mut proposed_at: Option<Instant> = None;
        loop {
            {
                let mut core = self.core.borrow_mut();
                if core.voters.contains(&node) || core.learners.contains(&node) {
                    let nodes = core
                        .state
                        .nodes
                        .iter()
                        .map(|(id, info)| (*id, info.addr.clone()))
                        .collect();
                    return Reply::Joined { nodes };
                }
                if Instant::now() > deadline {
                    return Reply::Error {
                        message: format!("node {node} not admitted within {APPLY_TIMEOUT:?}"),
                    };
                }
                if proposed_at.is_none_or(|at| at.elapsed() > PROPOSE_AGAIN_AFTER) {
                    proposed_at = Some(Instant::now());
                    let mut change = ConfChange::default();
                    change.set_change_type(ConfChangeType::AddLearnerNode);
                    change.node_id = node;
                    change.context = addr.clone().into_bytes().into();
                    if let Err(e) = core.raft.propose_conf_change(Vec::new(), change) {
                        return Reply::Error {
                            message: format!("no leader takes the change ({e})"),
                        };
                    }
                }
            }
            self.handle_ready();
            glommio::timer::sleep(TICK).await;
        }
    }

    /// What this node is as a client of its cluster (node id 0).
    fn client_identity(&self) -> Identity {
        Identity::new(&self.cluster, CLIENT_NODE, &self.secret)
            .expect("the node's identity was valid")
    }

    /// The other members the state names, with their addresses.
    fn other_members(&self, core: &Core) -> Vec<(u64, SocketAddr)> {
        core.state
            .nodes
            .iter()
            .filter(|(id, _)| **id != self.id)
            .filter_map(|(id, info)| Some((*id, info.addr.parse().ok()?)))
            .collect()
    }

    /// Ask the member at `addr` to admit this node, until it has.
    async fn join_loop(self: Rc<Self>, addr: SocketAddr) {
        let client = self.client_identity();
        loop {
            let request = Request::Join {
                node: self.id,
                addr: self.listen.to_string(),
            };
            match client::request_on_executor(addr, &client, &request).await {
                Ok(Reply::Joined { nodes }) => {
                    eprintln!(
                        "dirigo node {}: joined through {addr}: members {nodes:?}",
                        self.id
                    );
                    self.core.borrow_mut().known_addrs.extend(nodes);
                    // Sessions to members this node dials.
                    let ids: Vec<u64> = self.core.borrow().known_addrs.keys().copied().collect();
                    for id in ids {
                        if id != self.id {
                            self.session(id);
                        }
                    }
                    return;
                }
                Ok(other) => {
                    eprintln!("dirigo node {}: joining through {addr}: {other:?}", self.id)
                }
                Err(e) => eprintln!("dirigo node {}: joining through {addr}: {e}", self.id),
            }
            glommio::timer::sleep(Duration::from_millis(500)).await;
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let core = self.core.borrow();
        // CPU figures where this node knows them: its own runs', and (the
        // leader) the fresh reports of the others.
        let now = Instant::now();
        let fresh: HashMap<u64, (Report, Instant)> = core
            .reports
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) < load::REPORT_FRESH)
            .map(|(id, report)| (*id, report.clone()))
            .collect();
        let own = core.meter.parts();
        let own_milli = total_milli(own.values());
        let cpu = cpu_view(self.id, &core.state, own, &fresh);
        let own = own_latency(&core.runs, now);
        let latency = latency_view(self.id, &core.state, own, &fresh);
        let nodes: Vec<serde_json::Value> = core
            .state
            .nodes
            .iter()
            .map(|(id, info)| {
                let cpu_milli = if *id == self.id {
                    Some(own_milli)
                } else {
                    fresh
                        .get(id)
                        .map(|(report, _)| total_milli(report.parts.values()))
                };
                serde_json::json!({
                    "id": id,
                    "addr": info.addr,
                    "alive": info.alive,
                    "voter": core.voters.contains(id),
                    "leaving": info.retired,
                    "cpu_milli": cpu_milli,
                    "cores": core.cores.get(id),
                })
            })
            .collect();
        // Running jobs first, then the others, newest first, as many as
        // fit a reply.
        let mut ordered: Vec<&state::Job> = core.state.jobs.values().collect();
        ordered.sort_by_key(|job| {
            let number = submission_number(&job.name);
            (job.state != JobState::Running, std::cmp::Reverse(number))
        });
        let mut jobs = Vec::new();
        let mut bytes = 0;
        let mut omitted = 0;
        for job in ordered {
            let mut object = serde_json::Map::new();
            if let Some(serde_json::Value::Object(report)) = &job.report {
                let others: Vec<&JsonMap> = job
                    .part_reports
                    .values()
                    .filter_map(serde_json::Value::as_object)
                    .collect();
                object.extend(merged_report(report, &others));
            }
            object.insert("name".into(), job.name.clone().into());
            object.insert("query".into(), job.query.clone().into());
            object.insert("state".into(), state::state_name(job.state).into());
            object.insert("node".into(), job.node.into());
            object.insert("peers".into(), job.peers.clone().into());
            object.insert("ports".into(), job.ports.clone().into());
            object.insert("epoch".into(), job.epoch.into());
            if job.state == JobState::Running {
                let parts: Vec<u32> = job
                    .placement()
                    .into_iter()
                    .filter_map(|n| measured(&cpu, n, &job.name))
                    .collect();
                if !parts.is_empty() {
                    object.insert("cpu_milli".into(), total_milli(&parts).into());
                }
                if let Some(permille) = job_latency(job, &latency) {
                    let of_slo = f64::from(permille) / 1e3;
                    object.insert("latency_p99_of_slo".into(), of_slo.into());
                }
            }
            if let Some(error) = &job.error {
                object.insert("error".into(), error.clone().into());
            }
            let object = serde_json::Value::Object(object);
            let size = object.to_string().len();
            if bytes + size > STATUS_JOBS_BYTES_MAX {
                omitted += 1;
                continue;
            }
            bytes += size;
            jobs.push(object);
        }
        serde_json::json!({
            "node": self.id,
            "leader": core.raft.raft.leader_id,
            "applied": core.applied,
            "nodes": nodes,
            "jobs": jobs,
            "jobs_omitted": omitted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any parts a peer sends (any header, any order, any sizes): no
        /// panic, never more gathered than the bound, and a whole message
        /// only from parts 0..n in order.
        #[test]
        fn any_parts_are_taken_without_a_panic_or_overgrowth(
            parts in proptest::collection::vec(
                (0u32..6, 0u32..6, 0usize..300, any::<bool>()),
                1..40,
            ),
        ) {
            let mut assembly = Assembly::default();
            let mut expected: Option<(u32, u32)> = None;
            for (part, parts_total, len, huge) in parts {
                let total = if huge { u32::MAX } else { parts_total };
                let mut body = part.to_le_bytes().to_vec();
                body.extend_from_slice(&total.to_le_bytes());
                body.extend(std::iter::repeat_n(part as u8, len));
                let result = assembly.take(&body);
                prop_assert!(assembly.bytes.len() <= RAFT_ASSEMBLED_BYTES_MAX);
                // What a correct sender's sequence would allow.
                let in_order = if part == 0 {
                    true
                } else {
                    expected == Some((part, total))
                };
                match result {
                    Ok(Some(_)) => {
                        prop_assert!(in_order && part + 1 == total);
                        expected = None;
                    }
                    Ok(None) => {
                        prop_assert!(in_order && part + 1 < total);
                        expected = Some((part + 1, total));
                    }
                    Err(_) => expected = None,
                }
            }
        }
    }

    fn part(part: u32, parts: u32, bytes: &[u8]) -> Vec<u8> {
        let mut body = part.to_le_bytes().to_vec();
        body.extend_from_slice(&parts.to_le_bytes());
        body.extend_from_slice(bytes);
        body
    }

    /// Parts come together in order; a part out of place drops what was
    /// gathered, a part 0 starts again, and nothing past the bound is kept.
    #[test]
    fn a_message_in_parts_is_put_together_in_order_only() {
        let mut assembly = Assembly::default();
        assert_eq!(assembly.take(&part(0, 3, b"ab")), Ok(None));
        assert_eq!(assembly.take(&part(1, 3, b"cd")), Ok(None));
        assert_eq!(
            assembly.take(&part(2, 3, b"e")),
            Ok(Some(b"abcde".to_vec()))
        );
        // Out of place: part 2 where 1 was next.
        assert_eq!(assembly.take(&part(0, 3, b"ab")), Ok(None));
        let error = assembly.take(&part(2, 3, b"e")).unwrap_err();
        assert!(
            error.contains("part 2 of 3 where part 1 of 3 was next"),
            "{error}"
        );
        assert!(assembly.take(&part(1, 3, b"cd")).is_err());
        // A new message from part 0 on, also over an unfinished one.
        assert_eq!(assembly.take(&part(0, 2, b"x")), Ok(None));
        assert_eq!(assembly.take(&part(0, 2, b"y")), Ok(None));
        assert_eq!(assembly.take(&part(1, 2, b"z")), Ok(Some(b"yz".to_vec())));
        // Short, or announcing more parts than the bound allows.
        assert!(assembly.take(&[0, 0, 0]).is_err());
        let too_many = (RAFT_ASSEMBLED_BYTES_MAX / RAFT_PART_BYTES + 2) as u32;
        assert!(assembly.take(&part(0, too_many, b"a")).is_err());
        assert!(assembly.take(&part(0, 0, b"a")).is_err());
    }

    /// The leader places a job on the least loaded nodes, as many as
    /// divide its shards, with a port each that no running placement uses,
    /// going round the range.
    #[test]
    fn placements_take_the_idlest_nodes_and_free_ports() {
        let range: PortRange = "100-103".parse().unwrap();
        let mut load = unmeasured(&[(1, 2), (2, 0), (3, 1)]);
        let mut in_use: BTreeSet<u16> = [101].into();
        let mut cursor = 0;
        let placed = place(&mut load, 2, &mut in_use, &mut cursor, range);
        assert_eq!(placed, Some((2, vec![3], vec![100, 102])));
        assert_eq!(load, unmeasured(&[(1, 2), (2, 1), (3, 2)]));
        assert_eq!(in_use, [100, 101, 102].into());
        // One shard: one node, no port.
        let placed = place(&mut load, 1, &mut in_use, &mut cursor, range);
        assert_eq!(placed, Some((2, vec![], vec![])));
        // Three shards over three nodes: one port is left, too few.
        assert_eq!(place(&mut load, 3, &mut in_use, &mut cursor, range), None);
        in_use.remove(&100);
        assert_eq!(place(&mut load, 3, &mut in_use, &mut cursor, range), None);
        in_use.remove(&101);
        // The cursor went past 102: 103 first, then round to 100.
        let placed = place(&mut load, 3, &mut in_use, &mut cursor, range).unwrap();
        assert_eq!(placed.2, vec![103, 100, 101]);
        assert_eq!(
            place(&mut BTreeMap::new(), 1, &mut in_use, &mut cursor, range),
            None
        );
        for bad in ["", "7", "0-5", "9-8", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    /// Nodes of these parts, none measured.
    fn unmeasured(parts: &[(u64, usize)]) -> BTreeMap<u64, Load> {
        parts
            .iter()
            .map(|&(id, parts)| {
                let milli = UNMEASURED_MILLI * parts as u32;
                let unmeasured = parts;
                (
                    id,
                    Load {
                        parts,
                        milli,
                        unmeasured,
                    },
                )
            })
            .collect()
    }

    /// A cluster state of nodes 1 to `n`.
    fn nodes(n: u64) -> ClusterState {
        let mut state = ClusterState::default();
        for id in 1..=n {
            state.add_node(id, format!("127.0.0.1:{id}"));
        }
        state
    }

    /// A job of `cores` shards placed on `node` alone.
    fn add_job(state: &mut ClusterState, number: u64, cores: &str, node: u64) {
        state.apply(Command::Submit {
            request: number,
            query: "q5".into(),
            args: vec![
                "--data-dir".into(),
                format!("d{number}"),
                "--cores".into(),
                cores.into(),
            ],
            cwd: "/".into(),
        });
        state.apply(Command::Assign {
            job: format!("q5-{number}"),
            node,
            epoch: 1,
            peers: vec![],
            ports: vec![],
        });
    }

    /// A new job goes to the node whose parts use the least CPU, though it
    /// runs more of them; one not measured weighs a quarter of a core.
    #[test]
    fn placements_take_the_node_whose_parts_use_the_least_cpu() {
        let range: PortRange = "100-199".parse().unwrap();
        let mut state = nodes(3);
        add_job(&mut state, 1, "1", 1);
        add_job(&mut state, 2, "1", 2);
        add_job(&mut state, 3, "1", 2);
        let cpu: CpuView = [
            ((1, "q5-1".to_string()), 1_400),
            ((2, "q5-2".to_string()), 30),
            ((2, "q5-3".to_string()), 20),
        ]
        .into();
        let mut load = load_of(&state, 1..=3, &cpu);
        assert_eq!(
            load[&1],
            Load {
                parts: 1,
                milli: 1_400,
                unmeasured: 0
            }
        );
        assert_eq!(
            load[&2],
            Load {
                parts: 2,
                milli: 50,
                unmeasured: 0
            }
        );
        let (mut in_use, mut cursor) = (BTreeSet::new(), 0);
        // Node 3 (nothing); then node 2 (0.05 cores, less than the
        // quarter of a core node 3's new part weighs).
        let first = place(&mut load, 1, &mut in_use, &mut cursor, range);
        assert_eq!(first, Some((3, vec![], vec![])));
        let second = place(&mut load, 1, &mut in_use, &mut cursor, range);
        assert_eq!(second, Some((2, vec![], vec![])));
        // By parts alone node 1 would have been next; by CPU it is last.
        let third = place(&mut load, 1, &mut in_use, &mut cursor, range);
        assert_eq!(third, Some((3, vec![], vec![])));
    }

    /// A job's figures over its parts: counts summed, the longest
    /// elapsed time and the rates from it, SLO violations over every
    /// part's rows, the largest latency; percentiles stay part 0's.
    #[test]
    fn the_parts_figures_add_up() {
        let part = |events: u64, outputs: u64, elapsed_s: f64, pct: f64, max: u64| {
            serde_json::json!({
                "query": "q5", "cores": 1, "events": events, "outputs": outputs,
                "elapsed_s": elapsed_s, "events_per_s": events as f64 / elapsed_s,
                "slo_violation_pct": pct, "deadline_misses": 1, "scale_actions": max / 10,
                "latency_us": {"p50": 10, "p99": 20, "max": max},
                "checkpoints": {"completed": 4},
            })
            .as_object()
            .unwrap()
            .clone()
        };
        let part0 = part(600, 300, 2.0, 10.0, 50);
        let part1 = part(400, 100, 4.0, 50.0, 90);
        let merged = merged_report(&part0, &[&part1]);
        assert_eq!(merged["events"], 1_000);
        assert_eq!(merged["outputs"], 400);
        assert_eq!(merged["cores"], 2);
        assert_eq!(merged["deadline_misses"], 2);
        // Each node's autoscaler acts on its own part: 5 and 9 actions.
        assert_eq!(merged["scale_actions"], 14);
        assert_eq!(merged["elapsed_s"], 4.0);
        assert_eq!(merged["events_per_s"], 250.0);
        assert_eq!(merged["events_per_s_per_core"], 125.0);
        // (300 rows x 10% + 100 x 50%) / 400 rows.
        assert_eq!(merged["slo_violation_pct"], 20.0);
        assert_eq!(merged["latency_us"]["max"], 90);
        assert_eq!(merged["latency_us"]["p99"], 20);
        assert_eq!(merged["checkpoints"], part0["checkpoints"]);
        assert_eq!(merged["parts_reported"], 2);
        // One part: its figures as they are.
        assert_eq!(merged_report(&part0, &[]), part0);
        // What goes in the log of a part's summary is what is added up.
        let summary = part_summary(&serde_json::Value::Object(part1.clone()));
        assert!(summary.to_string().len() <= state::PART_REPORT_BYTES_MAX);
        assert!(summary.get("checkpoints").is_none() && summary.get("query").is_none());
        let from_summary = merged_report(&part0, &[summary.as_object().unwrap()]);
        assert_eq!(from_summary, merged);
    }

    /// A finished job's ports stay taken while a part of it may still be
    /// ending; a running job's always.
    #[test]
    fn a_finished_jobs_ports_stay_taken_a_while() {
        let mut state = nodes(2);
        for (number, ports) in [(1u64, [7700u16, 7701]), (2, [7702, 7703])] {
            state.apply(Command::Submit {
                request: number,
                query: "q5".into(),
                args: vec!["--data-dir".into(), format!("d{number}")],
                cwd: "/".into(),
            });
            state.apply(Command::Assign {
                job: format!("q5-{number}"),
                node: 1,
                epoch: 1,
                peers: vec![2],
                ports: ports.to_vec(),
            });
        }
        state.apply(Command::Ended {
            job: "q5-1".into(),
            epoch: 1,
            outcome: Outcome::Finished { report: None },
        });
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        note_finished(&state, &mut seen, t0);
        assert_eq!(seen.len(), 1);
        let all: BTreeSet<u16> = [7700, 7701, 7702, 7703].into();
        assert_eq!(ports_in_use(&state, &seen, t0), all);
        // Noted once: later looks do not restart the clock.
        note_finished(&state, &mut seen, t0 + Duration::from_secs(3));
        assert_eq!(seen["q5-1"], t0);
        let later = t0 + PART_GRACE + Duration::from_secs(1);
        assert_eq!(ports_in_use(&state, &seen, later), [7702, 7703].into());
        // A job no longer finished in the state (forgotten) is forgotten.
        state.jobs.remove("q5-1");
        note_finished(&state, &mut seen, later);
        assert!(seen.is_empty());
    }

    /// `widen_or_rebalance` with no node's cores known, and no job ripe
    /// for narrowing.
    fn one_move(
        state: &ClusterState,
        load: &BTreeMap<u64, Load>,
        cpu: &CpuView,
        quiet: &BTreeSet<String>,
        in_use: &mut BTreeSet<u16>,
        cursor: &mut u16,
        range: PortRange,
    ) -> Option<(Command, MoveKind, String)> {
        let (cores, ripe) = (BTreeMap::new(), BTreeSet::new());
        let weighing = Weighing {
            f: Figures {
                load,
                cpu,
                cores: &cores,
                latency: &LatencyView::new(),
            },
            quiet,
            ripe: &ripe,
            settled: &ripe,
            late: &ripe,
        };
        widen_or_rebalance(state, &weighing, in_use, cursor, range)
    }

    /// The leader's view of the CPU: its own runs' by name, the others'
    /// reports by job number, of running jobs only.
    #[test]
    fn the_leader_reads_reports_by_job_number() {
        let mut state = nodes(2);
        add_job(&mut state, 1, "1", 1);
        add_job(&mut state, 2, "1", 2);
        add_job(&mut state, 3, "1", 2);
        state.apply(Command::Cancel {
            request: 9,
            job: "q5-3".into(),
        });
        let own: BTreeMap<String, u32> = [("q5-1".to_string(), 700)].into();
        let report = Report {
            cores: 2,
            parts: [(2, 300), (3, 40), (99, 50)].into(),
            latency: [(2, 1_500), (3, 10), (99, 10)].into(),
        };
        let reports = [(2, (report, Instant::now()))].into_iter().collect();
        let cpu = cpu_view(1, &state, own.clone(), &reports);
        let expected: CpuView = [
            ((1, "q5-1".to_string()), 700),
            ((2, "q5-2".to_string()), 300),
        ]
        .into();
        assert_eq!(cpu, expected);
        // The latency alike, each part's own.
        let latency = latency_view(1, &state, [("q5-1".to_string(), 200)].into(), &reports);
        let expected: LatencyView = [
            ((1, "q5-1".to_string()), 200),
            ((2, "q5-2".to_string()), 1_500),
        ]
        .into();
        assert_eq!(latency, expected);
        assert_eq!(job_latency(&state.jobs["q5-2"], &latency), Some(1_500));
        assert!(over_slo(&state.jobs["q5-2"], &latency));
        assert!(!slo_room(&state.jobs["q5-2"], &latency));
        assert!(!over_slo(&state.jobs["q5-1"], &latency));
        assert!(slo_room(&state.jobs["q5-1"], &latency));
        let load = load_of(&state, 1..=2, &cpu);
        assert_eq!(
            load[&2],
            Load {
                parts: 1,
                milli: 300,
                unmeasured: 0
            }
        );
    }

    /// For load: the measured part that narrows the CPU gap most moves to
    /// the idlest node, and says so; a job moved for load lately stays;
    /// by parts, no move that would leave the target busier than the
    /// source.
    #[test]
    fn the_leader_moves_a_part_for_load_and_never_onto_a_busier_node() {
        let range: PortRange = "100-199".parse().unwrap();
        let mut state = nodes(2);
        add_job(&mut state, 1, "1", 1);
        add_job(&mut state, 2, "1", 1);
        let cpu: CpuView = [
            ((1, "q5-1".to_string()), 900),
            ((1, "q5-2".to_string()), 700),
        ]
        .into();
        let load = load_of(&state, 1..=2, &cpu);
        let (mut in_use, mut cursor) = (BTreeSet::new(), 0);
        let quiet = BTreeSet::new();
        let (command, kind, why) =
            one_move(&state, &load, &cpu, &quiet, &mut in_use, &mut cursor, range).unwrap();
        assert_eq!(
            command,
            Command::Move {
                job: "q5-2".into(),
                epoch: 1,
                to: 2,
                peers: vec![],
                ports: vec![],
                quick: false,
                narrowed: false,
            }
        );
        assert_eq!(kind, MoveKind::Load);
        assert!(why.starts_with("rebalance by load"), "{why}");
        assert!(why.contains("node 1 uses 1.60 cores, node 2 0.00"), "{why}");
        // Moved lately: not again, for load or by parts.
        let quiet: BTreeSet<String> = ["q5-1".to_string(), "q5-2".to_string()].into();
        let none = one_move(&state, &load, &cpu, &quiet, &mut in_use, &mut cursor, range);
        assert_eq!(none, None);
        // Three light parts on node 1, one heavy on node 2: two parts
        // more, but a light part on node 2 would leave it the busier.
        let mut state = nodes(2);
        for number in 1..=3 {
            add_job(&mut state, number, "1", 1);
        }
        add_job(&mut state, 4, "1", 2);
        let mut cpu: CpuView = (1..=3).map(|n| ((1, format!("q5-{n}")), 10)).collect();
        cpu.insert((2, "q5-4".to_string()), 1_000);
        let load = load_of(&state, 1..=2, &cpu);
        let quiet = BTreeSet::new();
        let none = one_move(&state, &load, &cpu, &quiet, &mut in_use, &mut cursor, range);
        assert_eq!(none, None);
        // Not measured (a quarter of a core each), the same parts move.
        let cpu = CpuView::new();
        let load = load_of(&state, 1..=2, &cpu);
        let (command, kind, why) =
            one_move(&state, &load, &cpu, &quiet, &mut in_use, &mut cursor, range).unwrap();
        assert_eq!(kind, MoveKind::Parts);
        // Right after a move for load: node 2's part not yet measured
        // (weighing a quarter of a core where it may weigh much more),
        // node 1's three are: no part moves onto node 2 by parts.
        let mut cpu: CpuView = (1..=3).map(|n| ((1, format!("q5-{n}")), 300)).collect();
        cpu.remove(&(2, "q5-4".to_string()));
        let load = load_of(&state, 1..=2, &cpu);
        assert_eq!(load[&2].unmeasured, 1);
        let none = one_move(&state, &load, &cpu, &quiet, &mut in_use, &mut cursor, range);
        assert_eq!(none, None);
        assert!(
            matches!(&command, Command::Move { job, to: 2, .. } if job == "q5-3"),
            "{command:?}"
        );
        assert!(why.starts_with("rebalance by parts"), "{why}");
    }

    /// A job over two nodes whose parts fit on one with half its cores to
    /// spare, and a core per shard, is narrowed onto the least loaded once
    /// ripe (not while quiet, nor with a part or the target unmeasured, nor
    /// too heavy, nor onto too few cores or cores not known); narrowed, it
    /// stays so until its node is saturated by a part of it of a quarter
    /// of a core or more, and then widens again; moves by parts keep it
    /// narrowed.
    #[test]
    fn the_leader_narrows_a_job_that_fits_on_fewer_nodes_and_widens_it_when_saturated() {
        let range: PortRange = "100-199".parse().unwrap();
        let mut state = nodes(3);
        state.apply(Command::Submit {
            request: 1,
            query: "q5".into(),
            args: ["--data-dir", "d1", "--cores", "2"]
                .map(String::from)
                .to_vec(),
            cwd: "/".into(),
        });
        state.apply(Command::Assign {
            job: "q5-1".into(),
            node: 2,
            epoch: 1,
            peers: vec![3],
            ports: vec![100, 101],
        });
        let two_cores: BTreeMap<u64, u16> = (1..=3).map(|n| (n, 2)).collect();
        let light: CpuView = [
            ((2, "q5-1".to_string()), 200),
            ((3, "q5-1".to_string()), 150),
        ]
        .into();
        let ripe: BTreeSet<String> = ["q5-1".to_string()].into();
        let none = BTreeSet::new();
        let decide = |state: &ClusterState,
                      cpu: &CpuView,
                      cores: &BTreeMap<u64, u16>,
                      quiet: &BTreeSet<String>,
                      ripe: &BTreeSet<String>| {
            let load = load_of(state, 1..=3, cpu);
            let settled = BTreeSet::new();
            let weighing = Weighing {
                f: Figures {
                    load: &load,
                    cpu,
                    cores,
                    latency: &LatencyView::new(),
                },
                quiet,
                ripe,
                settled: &settled,
                late: &BTreeSet::new(),
            };
            let (mut in_use, mut cursor) = (BTreeSet::new(), 0);
            widen_or_rebalance(state, &weighing, &mut in_use, &mut cursor, range)
        };
        let (command, kind, why) = decide(&state, &light, &two_cores, &none, &ripe).unwrap();
        let narrowed = Command::Move {
            job: "q5-1".into(),
            epoch: 1,
            to: 1,
            peers: vec![],
            ports: vec![],
            quick: false,
            narrowed: true,
        };
        assert_eq!((&command, kind), (&narrowed, MoveKind::Narrow));
        assert_eq!(
            why, "narrowing it from 2 nodes onto 1: its parts use 0.35 cores",
            "{why}"
        );
        // Not ripe, or quiet: it stays (nothing else to do either).
        assert_eq!(decide(&state, &light, &two_cores, &none, &none), None);
        assert_eq!(decide(&state, &light, &two_cores, &ripe, &ripe), None);
        let load = load_of(&state, 1..=3, &light);
        assert_eq!(
            narrow_to(&state.jobs["q5-1"], &load, &light, &two_cores),
            Some(vec![1])
        );
        // A part not measured, too heavy for half a core of two, one core
        // for two shards, cores not known: nowhere.
        let mut unmeasured = light.clone();
        unmeasured.remove(&(3, "q5-1".to_string()));
        let heavy: CpuView = [
            ((2, "q5-1".to_string()), 600),
            ((3, "q5-1".to_string()), 401),
        ]
        .into();
        let one_core: BTreeMap<u64, u16> = (1..=3).map(|n| (n, 1)).collect();
        let unknown = BTreeMap::new();
        for (cpu, cores, what) in [
            (&unmeasured, &two_cores, "unmeasured"),
            (&heavy, &two_cores, "heavy"),
            (&light, &one_core, "one core"),
            (&light, &unknown, "cores not known"),
        ] {
            let load = load_of(&state, 1..=3, cpu);
            assert_eq!(
                narrow_to(&state.jobs["q5-1"], &load, cpu, cores),
                None,
                "{what}"
            );
        }
        // Node 1 busy with another job: onto node 2 (its own part there
        // left out of its weight), not node 1.
        let mut busy = light.clone();
        busy.insert((1, "q5-2".to_string()), 900);
        add_job(&mut state, 2, "1", 1);
        let load = load_of(&state, 1..=3, &busy);
        assert_eq!(
            narrow_to(&state.jobs["q5-1"], &load, &busy, &two_cores),
            Some(vec![2])
        );
        state.apply(Command::Cancel {
            request: 9,
            job: "q5-2".into(),
        });
        // Narrowed onto node 1.
        state.apply(narrowed);
        for node in [2, 3] {
            state.apply(Command::Released {
                job: "q5-1".into(),
                epoch: 1,
                node,
            });
        }
        assert_eq!(state.jobs["q5-1"].placement(), vec![1]);
        assert!(state.jobs["q5-1"].narrowed);
        // Busy but not saturated: it stays on one node.
        let on_one = |milli: u32| -> CpuView { [((1, "q5-1".to_string()), milli)].into() };
        assert_eq!(
            decide(&state, &on_one(1_600), &two_cores, &none, &none),
            None
        );
        // Saturated: widened over two nodes, no longer narrowed.
        let (command, kind, why) =
            decide(&state, &on_one(1_800), &two_cores, &none, &none).unwrap();
        assert_eq!(kind, MoveKind::Widen);
        assert!(
            matches!(&command, Command::Move { to: 1, peers, narrowed: false, .. } if peers == &vec![2]),
            "{command:?}"
        );
        assert_eq!(
            why,
            "widening it over 2 nodes: node 1 uses 1.80 of its 2 cores"
        );
        // Not while quiet (just narrowed: its first figures there, catching
        // up, say nothing of its load).
        let just = ["q5-1".to_string()].into();
        assert_eq!(
            decide(&state, &on_one(1_800), &two_cores, &just, &none),
            None
        );
        // Saturated by another job, its own part small: not widened; moved
        // by parts instead, still narrowed.
        add_job(&mut state, 3, "1", 1);
        let mut other = on_one(100);
        other.insert((1, "q5-3".to_string()), 1_700);
        let (command, kind, _) = decide(&state, &other, &two_cores, &none, &none).unwrap();
        assert_eq!(kind, MoveKind::Parts);
        assert!(
            matches!(&command, Command::Move { job, to: 2, narrowed: true, .. } if job == "q5-1"),
            "{command:?}"
        );
    }

    /// A narrowed job that runs late widens again though no node of it is
    /// saturated (not while quiet, nor once it no longer runs late); a job
    /// at its full width that runs late has its part moved off the node
    /// busiest with other parts onto the idlest node, when that one's
    /// parts use a quarter of a core less and are all measured.
    #[test]
    fn the_leader_widens_a_narrowed_job_that_runs_late_and_moves_a_late_part_off_a_busy_node() {
        let range: PortRange = "100-199".parse().unwrap();
        let two_cores: BTreeMap<u64, u16> = (1..=3).map(|n| (n, 2)).collect();
        let decide = |state: &ClusterState,
                      cpu: &CpuView,
                      latency: &LatencyView,
                      quiet: &BTreeSet<String>,
                      late: &BTreeSet<String>| {
            let load = load_of(state, 1..=3, cpu);
            let none = BTreeSet::new();
            let weighing = Weighing {
                f: Figures {
                    load: &load,
                    cpu,
                    cores: &two_cores,
                    latency,
                },
                quiet,
                ripe: &none,
                settled: &none,
                late,
            };
            let (mut in_use, mut cursor) = (BTreeSet::new(), 0);
            widen_or_rebalance(state, &weighing, &mut in_use, &mut cursor, range)
        };
        // q5-1, two shards, narrowed onto node 1, light.
        let mut state = nodes(3);
        add_job(&mut state, 1, "2", 1);
        state.jobs.get_mut("q5-1").unwrap().narrowed = true;
        let cpu: CpuView = [((1, "q5-1".to_string()), 300)].into();
        let latency: LatencyView = [((1, "q5-1".to_string()), 1_800)].into();
        let late: BTreeSet<String> = ["q5-1".to_string()].into();
        let none = BTreeSet::new();
        let (command, kind, why) = decide(&state, &cpu, &latency, &none, &late).unwrap();
        assert_eq!(kind, MoveKind::WidenLate);
        assert!(
            matches!(&command, Command::Move { job, peers, narrowed: false, .. } if job == "q5-1" && peers.len() == 1),
            "{command:?}"
        );
        assert_eq!(
            why,
            "widening it over 2 nodes: its latency p99 is 1.80 of its SLO"
        );
        // Just narrowed, or not late (long enough): it stays.
        assert_eq!(decide(&state, &cpu, &latency, &late, &late), None);
        assert_eq!(decide(&state, &cpu, &latency, &none, &none), None);

        // q5-1 of one shard on node 1 with q5-2, which uses 0.35 cores;
        // node 2 runs q5-3, node 3 nothing.
        let mut state = nodes(3);
        add_job(&mut state, 1, "1", 1);
        add_job(&mut state, 2, "1", 1);
        add_job(&mut state, 3, "1", 2);
        let mut cpu: CpuView = [
            ((1, "q5-1".to_string()), 100),
            ((1, "q5-2".to_string()), 350),
            ((2, "q5-3".to_string()), 200),
        ]
        .into();
        let latency: LatencyView = [((1, "q5-1".to_string()), 1_200)].into();
        let late: BTreeSet<String> = ["q5-1".to_string()].into();
        let (command, kind, why) = decide(&state, &cpu, &latency, &none, &late).unwrap();
        assert_eq!(kind, MoveKind::Late);
        assert_eq!(
            command,
            Command::Move {
                job: "q5-1".into(),
                epoch: 1,
                to: 3,
                peers: vec![],
                ports: vec![],
                quick: false,
                narrowed: false,
            }
        );
        assert_eq!(
            why,
            "its latency p99 is 1.20 of its SLO: the other parts on node 1 use 0.35 cores, on node 3 0.00"
        );
        // Not late: only the rule by parts moves it (the gap, 0.45 cores,
        // is under the one for load); quiet: nothing.
        let not_late = decide(&state, &cpu, &latency, &none, &none);
        assert!(
            matches!(not_late, Some((_, MoveKind::Parts, _))),
            "{not_late:?}"
        );
        assert_eq!(decide(&state, &cpu, &latency, &late, &late), None);
        // Node 3 busy too: node 2 is the idlest, 0.2 under 0.35: too
        // close.
        add_job(&mut state, 4, "1", 3);
        cpu.insert((3, "q5-4".to_string()), 400);
        assert_eq!(decide(&state, &cpu, &latency, &none, &late), None);
        // Node 3 light: onto it; its part not measured: not onto it, and
        // node 2 is too close.
        cpu.insert((3, "q5-4".to_string()), 10);
        let (command, ..) = decide(&state, &cpu, &latency, &none, &late).unwrap();
        assert!(
            matches!(&command, Command::Move { to: 3, .. }),
            "{command:?}"
        );
        cpu.remove(&(3, "q5-4".to_string()));
        assert_eq!(decide(&state, &cpu, &latency, &none, &late), None);

        // A late job of two shards on node 1: node 2, the idlest, has one
        // core, so its part goes to node 3.
        let mut state = nodes(3);
        add_job(&mut state, 1, "2", 1);
        add_job(&mut state, 2, "1", 1);
        add_job(&mut state, 3, "1", 3);
        let cpu: CpuView = [
            ((1, "q5-1".to_string()), 100),
            ((1, "q5-2".to_string()), 600),
            ((3, "q5-3".to_string()), 100),
        ]
        .into();
        let load = load_of(&state, 1..=3, &cpu);
        let latency: LatencyView = [((1, "q5-1".to_string()), 2_000)].into();
        let cores: BTreeMap<u64, u16> = [(1, 2), (2, 1), (3, 2)].into();
        let weighing = Weighing {
            f: Figures {
                load: &load,
                cpu: &cpu,
                cores: &cores,
                latency: &latency,
            },
            quiet: &none,
            ripe: &none,
            settled: &none,
            late: &late,
        };
        let job = &state.jobs["q5-1"];
        assert_eq!(late_part_move(job, &weighing), Some((1, 3, 600, 100)));
        let cores: BTreeMap<u64, u16> = [(1, 2), (2, 2), (3, 2)].into();
        let weighing = Weighing {
            f: Figures {
                cores: &cores,
                ..weighing.f
            },
            ..weighing
        };
        assert_eq!(late_part_move(job, &weighing), Some((1, 2, 600, 0)));
    }

    /// The leader's watch: a job fits on fewer nodes and where it runs
    /// only with room in its SLO (or no latency known), runs late only
    /// over it and only for `LATE_AFTER` in one placement; a job answered
    /// for running late is neither ripe nor late until `LATE_HOLD` has
    /// passed.
    #[test]
    fn the_leader_watches_how_long_a_job_fits_and_runs_late() {
        let mut state = nodes(3);
        add_job(&mut state, 1, "2", 1);
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch: 1,
            to: 1,
            peers: vec![2],
            ports: vec![100, 101],
            quick: false,
            narrowed: false,
        });
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
            node: 1,
        });
        let epoch = state.jobs["q5-1"].epoch;
        assert_eq!(state.jobs["q5-1"].placement(), vec![1, 2]);
        let cores: BTreeMap<u64, u16> = (1..=3).map(|n| (n, 2)).collect();
        let cpu: CpuView = [
            ((1, "q5-1".to_string()), 200),
            ((2, "q5-1".to_string()), 150),
        ]
        .into();
        let load = load_of(&state, 1..=3, &cpu);
        let latency_of = |permille: Option<u32>| -> LatencyView {
            permille
                .map(|p| ((1, "q5-1".to_string()), p))
                .into_iter()
                .collect()
        };
        let after = Duration::from_secs(2);
        let job: BTreeSet<String> = ["q5-1".to_string()].into();
        let none = BTreeSet::new();
        let mut watch = Watch::default();
        let t0 = Instant::now();
        let note = |watch: &mut Watch, state: &ClusterState, permille, at| {
            let latency = latency_of(permille);
            let figures = Figures {
                load: &load,
                cpu: &cpu,
                cores: &cores,
                latency: &latency,
            };
            watch.note(state, &figures, at);
        };
        // No latency known: fits (by its CPU), not late; ripe and settled
        // once it has for `narrow_after`.
        note(&mut watch, &state, None, t0);
        let answers = watch.answers(after, t0 + after - Duration::from_millis(1));
        assert_eq!(
            (answers.ripe, answers.settled),
            (none.clone(), none.clone())
        );
        note(&mut watch, &state, Some(500), t0 + after);
        let answers = watch.answers(after, t0 + after);
        assert_eq!(
            answers,
            Answers {
                ripe: job.clone(),
                settled: job.clone(),
                late: none.clone()
            }
        );
        // Over half its SLO: neither, and starts again after.
        let t1 = t0 + 3 * after;
        note(&mut watch, &state, Some(501), t1);
        assert_eq!(
            watch.answers(after, t1),
            Answers {
                ripe: none.clone(),
                settled: none.clone(),
                late: none.clone()
            }
        );
        note(&mut watch, &state, Some(100), t1 + after);
        assert!(watch.answers(after, t1 + after).ripe.is_empty());
        // Over its SLO: late once it has been for `LATE_AFTER`.
        let t2 = t1 + 2 * after;
        note(&mut watch, &state, Some(1_001), t2);
        let short = t2 + load::LATE_AFTER - Duration::from_millis(1);
        note(&mut watch, &state, Some(3_000), short);
        assert!(watch.answers(after, short).late.is_empty());
        let t3 = t2 + load::LATE_AFTER;
        note(&mut watch, &state, Some(1_500), t3);
        assert_eq!(watch.answers(after, t3).late, job);
        // Answered: neither late nor ripe within `LATE_HOLD`, though it
        // stays late and then fits again.
        watch.late_answered.insert("q5-1".into(), t3);
        assert!(watch.answers(after, t3).late.is_empty());
        let t4 = t3 + after;
        note(&mut watch, &state, Some(100), t4);
        note(&mut watch, &state, Some(100), t4 + after);
        assert!(watch.answers(after, t4 + after).ripe.is_empty());
        assert_eq!(watch.answers(after, t4 + after).settled, job);
        let t5 = t3 + load::LATE_HOLD;
        note(&mut watch, &state, Some(100), t5);
        assert_eq!(watch.answers(after, t5).ripe, job);
        // In another placement it starts again.
        state.apply(Command::Move {
            job: "q5-1".into(),
            epoch,
            to: 2,
            peers: vec![3],
            ports: vec![102, 103],
            quick: false,
            narrowed: false,
        });
        for node in [1, 2] {
            state.apply(Command::Released {
                job: "q5-1".into(),
                epoch,
                node,
            });
        }
        assert_eq!(state.jobs["q5-1"].placement(), vec![2, 3]);
        let cpu_moved: CpuView = [
            ((2, "q5-1".to_string()), 200),
            ((3, "q5-1".to_string()), 150),
        ]
        .into();
        let load_moved = load_of(&state, 1..=3, &cpu_moved);
        let figures = Figures {
            load: &load_moved,
            cpu: &cpu_moved,
            cores: &cores,
            latency: &LatencyView::new(),
        };
        let t6 = t5 + Duration::from_millis(10);
        watch.note(&state, &figures, t6);
        assert!(watch.answers(after, t6).ripe.is_empty());
        assert_eq!(watch.answers(after, t6 + after).ripe, job);
    }

    /// A job not narrowed that fits where it runs is widened over a node
    /// that joins until it has fit there for `narrow_after` (settled);
    /// then it stays.
    #[test]
    fn a_job_that_has_fit_where_it_runs_is_not_widened() {
        let range: PortRange = "100-199".parse().unwrap();
        let mut state = nodes(2);
        add_job(&mut state, 1, "2", 1);
        let cpu: CpuView = [((1, "q5-1".to_string()), 1_200)].into();
        let cores: BTreeMap<u64, u16> = [(1, 4), (2, 4)].into();
        let load = load_of(&state, 1..=2, &cpu);
        assert!(fits_where_it_is(&state.jobs["q5-1"], &load, &cpu, &cores));
        // 1.2 of 2 cores is over half; not measured fits nowhere.
        let two: BTreeMap<u64, u16> = [(1, 2), (2, 2)].into();
        assert!(!fits_where_it_is(&state.jobs["q5-1"], &load, &cpu, &two));
        let unmeasured = load_of(&state, 1..=2, &CpuView::new());
        assert!(!fits_where_it_is(
            &state.jobs["q5-1"],
            &unmeasured,
            &CpuView::new(),
            &cores
        ));
        let none = BTreeSet::new();
        let settled: BTreeSet<String> = ["q5-1".to_string()].into();
        for (settled, widened) in [(&none, true), (&settled, false)] {
            let weighing = Weighing {
                f: Figures {
                    load: &load,
                    cpu: &cpu,
                    cores: &cores,
                    latency: &LatencyView::new(),
                },
                quiet: &none,
                ripe: &none,
                settled,
                late: &none,
            };
            let (mut in_use, mut cursor) = (BTreeSet::new(), 0);
            let got = widen_or_rebalance(&state, &weighing, &mut in_use, &mut cursor, range);
            assert_eq!(
                got.is_some_and(|(_, kind, _)| kind == MoveKind::Widen),
                widened,
                "settled {settled:?}"
            );
        }
    }

    /// The leader's one move: widen the oldest job that could run on more
    /// nodes, else move a part from the busiest node to the idlest while
    /// they differ by two parts or more.
    #[test]
    fn the_leader_widens_a_narrow_job_before_it_rebalances() {
        let range: PortRange = "100-199".parse().unwrap();
        let mut state = nodes(3);
        let add =
            |state: &mut ClusterState, number: u64, cores: &str| add_job(state, number, cores, 1);
        let none = CpuView::new();
        let load = |state: &ClusterState| load_of(state, state.nodes.keys().copied(), &none);
        let quiet = BTreeSet::new();
        let widen_or_rebalance = |state: &ClusterState,
                                  load: &BTreeMap<u64, Load>,
                                  in_use: &mut BTreeSet<u16>,
                                  cursor: &mut u16,
                                  range: PortRange| {
            one_move(state, load, &none, &quiet, in_use, cursor, range)
                .map(|(command, _, _)| command)
        };
        // All three on node 1, as placed on a cluster of one; q5-1 has two
        // shards.
        add(&mut state, 1, "2");
        add(&mut state, 2, "1");
        add(&mut state, 3, "1");
        let (mut in_use, mut cursor) = (BTreeSet::new(), 0);
        let first = widen_or_rebalance(&state, &load(&state), &mut in_use, &mut cursor, range);
        let Some(Command::Move {
            job,
            epoch,
            to,
            peers,
            ports,
            ..
        }) = first.clone()
        else {
            panic!("{first:?}");
        };
        assert_eq!((job.as_str(), epoch, to, peers), ("q5-1", 1, 2, vec![3]));
        assert_eq!(ports, vec![100, 101]);
        assert_eq!(in_use, [100, 101].into());
        state.apply(first.unwrap());
        state.apply(Command::Released {
            job: "q5-1".into(),
            epoch: 1,
            node: 1,
        });
        assert_eq!(state.jobs["q5-1"].placement(), vec![2, 3]);
        // Parts now 2, 1, 1: nothing to do.
        let next = widen_or_rebalance(&state, &load(&state), &mut in_use, &mut cursor, range);
        assert_eq!(next, None);
        // A fourth on node 1 (3, 1, 1): the newest there moves to the
        // idlest (the lower id of a tie).
        add(&mut state, 4, "1");
        let next = widen_or_rebalance(&state, &load(&state), &mut in_use, &mut cursor, range);
        assert_eq!(
            next,
            Some(Command::Move {
                job: "q5-4".into(),
                epoch: 1,
                to: 2,
                peers: vec![],
                ports: vec![],
                quick: false,
                narrowed: false,
            })
        );
        // A lost node does not count: with node 3 out of `load`, q5-1
        // (on 2 and 3) is no candidate, and node 2's part count is 1.
        let mut without_3 = load(&state);
        without_3.remove(&3);
        let next = widen_or_rebalance(&state, &without_3, &mut in_use, &mut cursor, range);
        assert!(
            matches!(&next, Some(Command::Move { job, to: 2, .. }) if job == "q5-4"),
            "{next:?}"
        );
    }
}

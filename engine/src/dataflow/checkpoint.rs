//! Checkpoints: asynchronous barrier snapshots of a job's state and source
//! positions, committed atomically, with exactly-once staged output.
//!
//! # Protocol
//!
//! Every `interval` the job's checkpointer (a thread per job, see
//! [`Checkpointer`]) requests epoch `n` (while a reroute of one of the job's
//! stages is under way the request waits for its end: checkpoints and
//! reroutes take turns, see `reroute`). Each source partition, at its next
//! turn, takes its position (`Source::position`), hands it over as its part of
//! `n` and sends a barrier `n` on every output channel, after the records it
//! produced before. A stage or sink partition *aligns*: once a barrier `n` came
//! on a channel, later messages of that channel wait in the actor until
//! barrier `n` came on every channel that has not ended. Then it forwards the
//! barrier at once and sends itself a `Snapshot`; until that is handled every
//! channel waits, so the state it hands over holds exactly the input before
//! the barriers, and the barrier does not wait for the snapshot. A stage
//! encodes the key groups its operator changed since its last part
//! (incremental) over as many turns as it takes (about 1 MiB each, so the
//! shard's other actors run in between) and writes them as one chunk on its
//! own shard, through glommio's io_uring (`runtime::spawn_io`), while it goes
//! on with what waited; the write's report follows its part. A sink seals what
//! it wrote since the last barrier (`Sink::seal`). Waiting messages are
//! bounded ([`ALIGN_BUFFER_MESSAGES_MAX`]): an actor over the bound declines `n`
//! (the checkpoint fails, the job runs on) and forwards a declined barrier so
//! that no one downstream waits for it.
//!
//! An actor whose input has ended hands over a *final* part (encoded for the
//! checkpointer's thread to write); it stands for it in every later
//! checkpoint, as no barrier can reach it any more. When every actor's part
//! (or final part) of `n` is in and no chunk write is out, the checkpointer
//! writes what the shards did not (sealed output was made durable as it
//! arrived), commits manifest `n` (write, fsync, rename, fsync the
//! directory) and then appends the staged rows of `n` to their output files. When every actor has a final
//! part it commits a last manifest marked finished. (Under the simulator,
//! where there is no executor, stages hand their groups to the checkpointer's
//! thread as bytes.)

//! # Failures
//!
//! A chunk write (on a shard or on the checkpointer's thread) or a manifest
//! write that fails (a full disk, an I/O error) fails that checkpoint: it is reported (`CheckpointStats::failed`, `last_error`), the
//! previous one stays valid, and the groups and sealed output of the failed
//! one are carried into the next, which the following interval retries. A
//! checkpoint that has not completed after [`CHECKPOINT_TIMEOUT_INTERVALS`]
//! intervals is abandoned the same way. A sealed output that cannot be made
//! durable, or an append to an output that fails after its manifest committed,
//! fails the job: the rows are not held anywhere else, and a rerun resumes from
//! the last manifest, which redoes the append.
//!
//! # Restore
//!
//! [`Checkpointer::open`] reads the newest manifest whose every part and staged
//! file checks out (each is checksummed); a corrupt or truncated one is skipped
//! with a warning and the one before it is used. The output files are brought to
//! exactly what that manifest committed (`storage::checkpoint::append_output` is
//! idempotent), and each actor takes its part at its first activation.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use dirigo_storage::checkpoint::Faults;
use dirigo_storage::checkpoint::{CheckpointDir, PartRef, StagedRef, StagedWriter};
use dirigo_storage::spool::{Spool, SPOOL_BUFFERS_MAX};
use hdrhistogram::Histogram;

mod nodes;
pub(crate) use nodes::Post;
pub use nodes::RemotePart;

/// Messages an aligning actor holds at most before it declines the checkpoint.
pub const ALIGN_BUFFER_MESSAGES_MAX: usize = 1024;

/// A checkpoint not complete after this many intervals (at least 10 s) is
/// abandoned and its content carried into the next.
pub const CHECKPOINT_TIMEOUT_INTERVALS: u32 = 10;

/// Tries of the final commit (one per interval, 200 ms at most apart) before
/// the job fails.
const FINAL_COMMIT_TRIES: u32 = 50;

/// Manifests kept: the newest complete one and the one before, for fallback.
const MANIFESTS_KEPT: usize = 2;

/// Where and how often a job checkpoints.
#[derive(Clone)]
pub struct CheckpointOptions {
    /// The job's data directory (`checkpoints/` and `staged/` inside).
    pub dir: PathBuf,
    pub interval: Duration,
    /// Injected storage faults, for tests.
    pub faults: Faults,
    /// This run's placement (a cluster's epoch for the job): the run claims
    /// the directory's fence with it at open, and commits no checkpoint
    /// once the fence holds a later placement. None: no fence.
    pub fence: Option<u64>,
}

impl CheckpointOptions {
    pub fn new(dir: impl Into<PathBuf>, interval: Duration) -> Self {
        CheckpointOptions {
            dir: dir.into(),
            interval,
            faults: Faults::default(),
            fence: None,
        }
    }
}

/// Claim `store` for placement `epoch`: refused if a later placement
/// holds it.
fn claim_fence(store: &CheckpointDir, dir: &Path, epoch: u64) -> Result<(), String> {
    let holder = store.fence().map_err(|e| e.to_string())?;
    if let Some(holder) = holder.filter(|h| *h > epoch) {
        return Err(format!(
            "placement {holder} has taken {} over (this run is placement {epoch})",
            dir.display()
        ));
    }
    store
        .set_fence(epoch)
        .map_err(|e| format!("claiming {}: {e}", dir.display()))
}

/// Rows a sink partition staged for one checkpoint: appended to `output` once the
/// checkpoint commits. `finish` (run on the checkpointer's thread) makes the
/// staged file durable and says what it holds.
pub struct Sealed {
    pub output: PathBuf,
    pub finish: Box<dyn FnOnce() -> Result<SealedFile, String> + Send>,
}

/// A staged file made durable.
pub struct SealedFile {
    pub staged: StagedRef,
    /// Writes of it that failed (a full disk) and succeeded when tried
    /// again, described: the checkpoint in flight fails with this reason.
    pub retried: Option<String>,
}

/// A stage and partition.
pub(crate) type ActorKey = (u32, u32);

/// A checkpointer's part in its job's checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The job runs on one node: this checkpointer does everything.
    Alone,
    /// Node 0 of a dataflow over nodes: requests epochs (and tells the
    /// other nodes), takes every node's parts, commits and appends.
    Coordinator,
    /// Another node: restores its actors from the committed checkpoint,
    /// and sends its actors' parts to the coordinator, their groups
    /// written and their sealed output durable (see `nodes`).
    Participant,
}

pub(crate) enum PartKind {
    /// The actor's part of `epoch`.
    Regular,
    /// The actor's input ended: this part stands for it from now on.
    Final,
    /// The actor could not take part in `epoch` (reason).
    Declined(String),
    /// The actor passed on a barrier of `epoch` that an actor upstream
    /// declined: it takes no part, but no barrier of `epoch` waits here now.
    Passed,
}

/// What an actor hands over at a barrier.
pub(crate) struct Part {
    pub actor: ActorKey,
    /// The actor's count of parts handed over, this one included (it
    /// travels with the actor): over nodes, an actor's parts may reach the
    /// coordinator by different ways, and it takes them in this order.
    pub seq: u64,
    pub epoch: u64,
    pub kind: PartKind,
    /// The actor's bookkeeping (source position, watermarks), encoded.
    pub meta: Vec<u8>,
    /// Key groups changed since the actor's last part.
    pub groups: Groups,
    pub sealed: Vec<Sealed>,
    /// From the first barrier of the epoch to the last, in ns (a stage's or
    /// sink's regular part; sources do not align).
    pub alignment_ns: Option<u64>,
}

/// An actor's changed key groups, as it hands them over.
pub(crate) enum Groups {
    /// `(group, bytes)`, empty bytes for a group that emptied: the
    /// checkpointer's thread writes them.
    Encoded(Vec<(u32, Vec<u8>)>),
    /// Being written on the actor's shard (`runtime::spawn_io`); a
    /// [`Written`] report follows.
    Writing,
    /// Where the shard wrote them (`None` for a group that emptied).
    At(Vec<(u32, Option<PartRef>)>),
}

impl Groups {
    pub(crate) fn none() -> Groups {
        Groups::Encoded(Vec::new())
    }
}

/// Where each written group is (`None`: it emptied).
pub(crate) type GroupsAt = Vec<(u32, Option<PartRef>)>;
/// `(group, bytes)` pairs.
pub(crate) type EncodedGroups = Vec<(u32, Vec<u8>)>;

/// The end of a shard-side chunk write of an actor's part of `epoch`.
pub(crate) struct Written {
    pub actor: ActorKey,
    pub epoch: u64,
    /// Where each group went, or the error and the groups' bytes (which the
    /// next checkpoint then writes).
    pub result: WriteOutcome,
}

/// Where a chunk write put each group, or why it failed and the groups'
/// bytes.
pub(crate) type WriteOutcome = Result<GroupsAt, (String, EncodedGroups)>;

/// What an actor gets back at its first activation after a restore.
pub(crate) struct Restored {
    pub meta: Vec<u8>,
    pub groups: Vec<(u32, Vec<u8>)>,
}

/// What a job's checkpoints measured.
#[derive(Clone)]
pub struct CheckpointStats {
    pub completed: u64,
    pub failed: u64,
    pub last_error: Option<String>,
    /// Epoch of the newest committed manifest (0: none yet).
    pub last_epoch: u64,
    /// Request to commit, per completed checkpoint.
    pub checkpoint_ms: Histogram<u64>,
    /// Alignment per actor and checkpoint (first barrier to last).
    pub alignment_us: Histogram<u64>,
    /// Encoded state the newest manifest refers to.
    pub state_bytes: u64,
    /// Bytes written by the newest checkpoint (changed groups only).
    pub incremental_bytes: u64,
    /// Bytes written by all checkpoints.
    pub written_bytes: u64,
    /// The epoch restored at start, and the warnings of any fallback.
    pub restored_epoch: Option<u64>,
    pub warnings: Vec<String>,
    /// Steps after the first in which a stage or sink handed back what had
    /// waited for an alignment (each a `Replay` it sent itself).
    pub replay_steps: u64,
    /// Over nodes, at node 0: parts taken from other nodes, and parts held
    /// until an earlier part of their actor came (see `nodes`).
    pub parts_from_nodes: u64,
    pub parts_held: u64,
}

impl Default for CheckpointStats {
    fn default() -> Self {
        CheckpointStats {
            completed: 0,
            failed: 0,
            last_error: None,
            last_epoch: 0,
            checkpoint_ms: Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid bounds"),
            alignment_us: Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"),
            state_bytes: 0,
            incremental_bytes: 0,
            written_bytes: 0,
            restored_epoch: None,
            warnings: Vec::new(),
            replay_steps: 0,
            parts_from_nodes: 0,
            parts_held: 0,
        }
    }
}

/// The identity of a job as its manifests record it: a resumed job must match.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, PartialEq, Debug)]
struct Shape {
    job: String,
    key_groups: u32,
    /// Stage names and parallelism, in stage order.
    stages: Vec<(String, u32)>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug)]
struct GroupRef {
    group: u32,
    file: String,
    offset: u64,
    len: u32,
    crc: u32,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Default)]
struct ActorEntry {
    stage: u32,
    partition: u32,
    /// Its input had ended: it takes no part in later checkpoints.
    ended: bool,
    meta: Vec<u8>,
    groups: Vec<GroupRef>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug)]
struct StagedEntry {
    file: String,
    len: u64,
    crc: u32,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone)]
struct OutputEntry {
    path: String,
    /// The output's length with every earlier checkpoint's rows appended.
    len_before: u64,
    staged: Vec<StagedEntry>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone)]
struct Manifest {
    shape: Shape,
    epoch: u64,
    finished: bool,
    actors: Vec<ActorEntry>,
    outputs: Vec<OutputEntry>,
}

impl GroupRef {
    fn part(&self) -> PartRef {
        PartRef {
            file: self.file.clone(),
            offset: self.offset,
            len: self.len,
            crc: self.crc,
        }
    }
}

impl StagedEntry {
    fn staged(&self) -> StagedRef {
        StagedRef {
            file: self.file.clone(),
            len: self.len,
            crc: self.crc,
        }
    }
}

/// What a data directory holds, for a command deciding what to do with it.
pub struct DirStatus {
    /// Epoch of the newest readable manifest, and whether the run had finished.
    pub epoch: u64,
    pub finished: bool,
}

/// The newest readable manifest of `dir` (`None`: no checkpoint yet).
pub fn inspect(dir: &Path) -> Result<Option<DirStatus>, String> {
    let store = CheckpointDir::open(dir).map_err(|e| e.to_string())?;
    let epochs = store.manifest_epochs().map_err(|e| e.to_string())?;
    for &epoch in epochs.iter().rev() {
        if let Ok(manifest) = read_manifest(&store, epoch) {
            return Ok(Some(DirStatus {
                epoch,
                finished: manifest.finished,
            }));
        }
    }
    Ok(None)
}

/// The files manifest `epoch` of `dir` refers to: `(chunk files, staged
/// files)`, each once (for tools and tests that inspect a data directory).
pub fn manifest_files(dir: &Path, epoch: u64) -> Result<(Vec<String>, Vec<String>), String> {
    let store = CheckpointDir::open(dir).map_err(|e| e.to_string())?;
    let manifest = read_manifest(&store, epoch)?;
    let mut chunks: Vec<String> = manifest
        .actors
        .iter()
        .flat_map(|a| a.groups.iter().map(|g| g.file.clone()))
        .collect();
    chunks.sort();
    chunks.dedup();
    let staged = manifest
        .outputs
        .iter()
        .flat_map(|o| o.staged.iter().map(|s| s.file.clone()))
        .collect();
    Ok((chunks, staged))
}

/// Per output of the newest readable manifest in `dir`: its path and its
/// length once that checkpoint's rows are appended (what a run resumed
/// from it brings the output to before it processes anything).
pub fn committed_output_lens(dir: &Path) -> Result<Vec<(String, u64)>, String> {
    let store = CheckpointDir::open(dir).map_err(|e| e.to_string())?;
    let epochs = store.manifest_epochs().map_err(|e| e.to_string())?;
    for &epoch in epochs.iter().rev() {
        if let Ok(manifest) = read_manifest(&store, epoch) {
            return Ok(manifest
                .outputs
                .iter()
                .map(|o| {
                    let staged: u64 = o.staged.iter().map(|s| s.len).sum();
                    (o.path.clone(), o.len_before + staged)
                })
                .collect());
        }
    }
    Ok(Vec::new())
}

/// Epochs of the manifests in `dir`, ascending (readable or not).
pub fn manifest_epochs(dir: &Path) -> Result<Vec<u64>, String> {
    let store = CheckpointDir::open(dir).map_err(|e| e.to_string())?;
    store.manifest_epochs().map_err(|e| e.to_string())
}

/// For a directory whose run finished: make sure every output holds what the
/// final checkpoint committed (a crash between its commit and its append left
/// the append undone; appending is idempotent).
pub fn complete_finished(dir: &Path) -> Result<(), String> {
    let store = CheckpointDir::open(dir).map_err(|e| e.to_string())?;
    let epochs = store.manifest_epochs().map_err(|e| e.to_string())?;
    for &epoch in epochs.iter().rev() {
        if let Ok(manifest) = read_manifest(&store, epoch) {
            if !manifest.finished {
                return Err(format!("the run in {} has not finished", dir.display()));
            }
            for output in &manifest.outputs {
                let staged: Vec<StagedRef> = output.staged.iter().map(|s| s.staged()).collect();
                store
                    .append_output(Path::new(&output.path), output.len_before, &staged)
                    .map_err(|e| format!("completing output {}: {e}", output.path))?;
            }
            return Ok(());
        }
    }
    Err(format!("no readable checkpoint in {}", dir.display()))
}

fn read_manifest(store: &CheckpointDir, epoch: u64) -> Result<Manifest, String> {
    let bytes = store.read_manifest(epoch).map_err(|e| e.to_string())?;
    crate::actor::decode_state::<Manifest>(&bytes)
        .map_err(|e| format!("manifest {epoch} does not decode: {e}"))
}

/// State the checkpointer's thread alone touches.
struct Committed {
    /// Per actor, its meta and where each of its groups is on disk.
    table: BTreeMap<ActorKey, (Vec<u8>, BTreeMap<u32, GroupRef>)>,
    /// Per output, its length with every committed checkpoint appended.
    out_len: BTreeMap<PathBuf, u64>,
    /// Manifests kept, oldest first.
    kept: VecDeque<Manifest>,
}

/// Checkpoints and reroutes of the job take turns (see `reroute`): no
/// reroute is ordered while an actor may align for a checkpoint, and no
/// checkpoint is requested while a reroute is under way.
#[derive(Default)]
struct Turns {
    /// An actor may align for the newest requested epoch: not every actor
    /// has reported its part (or its end, or a declined barrier passed on)
    /// for it yet.
    barriers_out: bool,
    /// A reroute of one of the job's stages is under way.
    rerouting: bool,
}

/// Where reports from actors meet the checkpointer's thread.
#[derive(Default)]
struct Inbox {
    parts: Vec<Part>,
    written: Vec<Written>,
    stop: bool,
}

/// A job's checkpoint coordinator: requests epochs, collects the actors' parts,
/// writes and commits them on its own thread (so no shard ever waits on a
/// disk), and hands restored parts to actors at activation.
pub struct Checkpointer {
    store: CheckpointDir,
    /// The data directory and this run's placement, when fenced.
    fence: Option<(PathBuf, u64)>,
    interval: Duration,
    shape: Shape,
    /// The epoch sources should inject next; 0 before the first request.
    requested: AtomicU64,
    replay_steps: AtomicU64,
    inbox: Mutex<Inbox>,
    wake: Condvar,
    restore: Mutex<BTreeMap<ActorKey, Restored>>,
    stats: Mutex<CheckpointStats>,
    /// The final manifest is committed.
    finished: AtomicBool,
    /// Set when the job must fail (an output could not be made durable).
    error: Mutex<Option<String>>,
    /// Filled by `open`, moved to the thread at `start`.
    committed: Mutex<Option<Committed>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    first_epoch: u64,
    /// Actors whose input had ended at the restored checkpoint.
    ended: Vec<ActorKey>,
    turns: Mutex<Turns>,
    role: Role,
    /// Over nodes: how to reach the job's monitors (set once the runtime
    /// runs, `connect`).
    link: OnceLock<nodes::Link>,
    /// The coordinator's parts in each actor's order (`nodes::InOrder`).
    in_order: Mutex<nodes::InOrder>,
    /// The coordinator's parts from other nodes still coming in pieces.
    pieces: Mutex<nodes::Pieces>,
    /// The coordinator's job was started (`Dataflow::start_job`): every
    /// node has registered it, so its monitors may be told.
    started: AtomicBool,
    /// Over nodes, the end or the failure was told to the others (or
    /// came from them).
    told: AtomicBool,
}

impl Checkpointer {
    /// Open `options.dir` for a job of this shape: restore from its newest
    /// complete checkpoint (falling back past corrupt ones with a warning), or
    /// start empty. A checkpoint of a different job shape is an error naming the
    /// difference, as is a directory whose run has finished.
    ///
    /// A participant (`role`) only reads: the coordinator alone claims the
    /// fence, brings the outputs to the checkpoint and deletes what no kept
    /// manifest refers to (every node opens before any starts the job, so
    /// all read the same manifests).
    pub(crate) fn open(
        options: CheckpointOptions,
        job: &str,
        stages: Vec<(String, u32)>,
        key_groups: u32,
        role: Role,
    ) -> Result<Checkpointer, String> {
        let reads_only = role == Role::Participant;
        let dir = &options.dir;
        let store = CheckpointDir::open(dir)
            .map_err(|e| format!("data directory {}: {e}", dir.display()))?
            .with_faults(options.faults.clone());
        // Claimed before anything is read: a run of an earlier placement
        // still going sees the claim before its next commit.
        if let Some(epoch) = options.fence.filter(|_| !reads_only) {
            claim_fence(&store, dir, epoch)?;
        }
        let shape = Shape {
            job: job.to_string(),
            key_groups,
            stages,
        };
        let epochs = store.manifest_epochs().map_err(|e| e.to_string())?;
        let mut warnings = Vec::new();
        let mut chosen = None;
        let mut older_readable = None;
        for (i, &epoch) in epochs.iter().enumerate().rev() {
            match load(&store, epoch, &shape) {
                Ok(loaded) => {
                    chosen = Some(loaded);
                    // The next older readable manifest stays, for a fallback
                    // from this one.
                    older_readable = epochs[..i]
                        .iter()
                        .rev()
                        .find_map(|&e| read_manifest(&store, e).ok());
                    break;
                }
                Err(LoadError::Mismatch(message)) => return Err(message),
                Err(LoadError::Corrupt(message)) => {
                    let warning = format!(
                        "checkpoint {epoch} in {} is unreadable, falling back: {message}",
                        dir.display()
                    );
                    eprintln!("warning: {warning}");
                    warnings.push(warning);
                }
            }
        }
        if chosen.is_none() && !epochs.is_empty() {
            return Err(format!(
                "no checkpoint in {} is readable ({}); start over with --fresh",
                dir.display(),
                warnings.join("; ")
            ));
        }
        let mut stats = CheckpointStats {
            warnings,
            ..CheckpointStats::default()
        };
        let mut committed = Committed {
            table: BTreeMap::new(),
            out_len: BTreeMap::new(),
            kept: VecDeque::new(),
        };
        let mut restore = BTreeMap::new();
        let mut ended = Vec::new();
        if let Some((manifest, parts)) = chosen {
            if manifest.finished {
                return Err(format!(
                    "the run in {} has already finished (checkpoint {})",
                    dir.display(),
                    manifest.epoch
                ));
            }
            // Bring every output to what this manifest committed.
            for output in manifest.outputs.iter().filter(|_| !reads_only) {
                let staged: Vec<StagedRef> = output.staged.iter().map(|s| s.staged()).collect();
                let len = store
                    .append_output(Path::new(&output.path), output.len_before, &staged)
                    .map_err(|e| format!("restoring output {}: {e}", output.path))?;
                committed.out_len.insert(PathBuf::from(&output.path), len);
            }
            for (entry, groups) in manifest.actors.iter().zip(parts) {
                let key = (entry.stage, entry.partition);
                let refs = entry.groups.iter().map(|g| (g.group, g.clone())).collect();
                committed.table.insert(key, (entry.meta.clone(), refs));
                if entry.ended {
                    ended.push(key);
                }
                restore.insert(
                    key,
                    Restored {
                        meta: entry.meta.clone(),
                        groups,
                    },
                );
            }
            stats.restored_epoch = Some(manifest.epoch);
            stats.last_epoch = manifest.epoch;
            stats.state_bytes = state_bytes(&committed.table);
            committed.kept.extend(older_readable);
            committed.kept.push_back(manifest);
        }
        // Staged files no kept manifest refers to are rows of checkpoints that
        // never committed: the restored sources produce them again.
        let (live_chunks, live_staged) = live_files(&committed.kept);
        let keep: Vec<u64> = committed.kept.iter().map(|m| m.epoch).collect();
        if !reads_only {
            store
                .retain(&keep, &live_chunks, Some(&live_staged))
                .map_err(|e| format!("cleaning {}: {e}", dir.display()))?;
        }
        let first_epoch = epochs.last().copied().unwrap_or(0) + 1;
        Ok(Checkpointer {
            store,
            fence: options.fence.map(|epoch| (options.dir.clone(), epoch)),
            interval: options.interval.max(Duration::from_millis(1)),
            shape,
            requested: AtomicU64::new(0),
            replay_steps: AtomicU64::new(0),
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            restore: Mutex::new(restore),
            stats: Mutex::new(stats),
            finished: AtomicBool::new(false),
            error: Mutex::new(None),
            committed: Mutex::new(Some(committed)),
            thread: Mutex::new(None),
            first_epoch,
            ended,
            turns: Mutex::default(),
            role,
            link: OnceLock::new(),
            in_order: Mutex::default(),
            pieces: Mutex::default(),
            started: AtomicBool::new(false),
            told: AtomicBool::new(false),
        })
    }

    /// Start the thread that requests and commits checkpoints. With no output to
    /// restore, every output the job names starts empty.
    pub(crate) fn start(self: &Arc<Self>, actors: Vec<ActorKey>, sources: Vec<ActorKey>) {
        let committed = self
            .committed
            .lock()
            .expect("checkpointer poisoned")
            .take()
            .expect("a checkpointer starts once");
        let this = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("checkpoint-{}", self.shape.job))
            .spawn(move || match this.role {
                Role::Participant => this.forward(),
                Role::Alone => this.run(committed, actors, sources),
                Role::Coordinator => {
                    if this.await_start() {
                        this.run(committed, actors, sources);
                    }
                    this.tell_over();
                }
            })
            .expect("spawning the checkpoint thread");
        *self.thread.lock().expect("checkpointer poisoned") = Some(thread);
    }

    /// Actors whose input had ended at the restored checkpoint: they will not
    /// report again (their sinks count as finished).
    pub(crate) fn ended_at_restore(&self) -> &[ActorKey] {
        &self.ended
    }

    /// The epoch a source should have injected by now (0: none yet).
    #[inline]
    pub(crate) fn requested(&self) -> u64 {
        self.requested.load(Ordering::Acquire)
    }

    /// An actor's part (called once per actor and checkpoint, never per
    /// message); `parts` is the actor's count of parts handed over, which
    /// numbers this one.
    pub(crate) fn report(&self, mut part: Part, parts: &mut u64) {
        *parts += 1;
        part.seq = *parts;
        match self.role {
            Role::Coordinator => self.admit_in_order(part),
            Role::Alone | Role::Participant => self.take_parts(std::iter::once(part)),
        }
    }

    /// Parts into the thread's inbox, in the order given.
    fn take_parts(&self, parts: impl IntoIterator<Item = Part>) {
        self.inbox
            .lock()
            .expect("checkpointer poisoned")
            .parts
            .extend(parts);
        self.wake.notify_one();
    }

    /// The end of a part's chunk write on its shard.
    pub(crate) fn report_written(&self, written: Written) {
        if self.role == Role::Coordinator {
            // Its part may be held for an earlier one of its actor; once
            // taken it must not wait for this report any more.
            if let Some(written) = self.written_for_held(written) {
                self.take_written(written);
            }
            return;
        }
        self.take_written(written);
    }

    fn take_written(&self, written: Written) {
        self.inbox
            .lock()
            .expect("checkpointer poisoned")
            .written
            .push(written);
        self.wake.notify_one();
    }

    /// The data directory, for chunk writes on the shards.
    pub(crate) fn store(&self) -> &CheckpointDir {
        &self.store
    }

    /// Begin a reroute of one of the job's stages: refused while an actor
    /// may align for a checkpoint (a partition holding what follows
    /// a reroute marker and one holding what follows a barrier could wait on
    /// each other, and a handoff in flight would be in no snapshot).
    pub(crate) fn begin_reroute(&self) -> Result<(), String> {
        let mut turns = self.turns.lock().expect("checkpointer poisoned");
        if turns.barriers_out {
            return Err(format!(
                "checkpoint {} is under way; a reroute waits for it",
                self.requested()
            ));
        }
        turns.rerouting = true;
        Ok(())
    }

    /// An actor may align for a checkpoint: a reroute would be refused now.
    pub(crate) fn barriers_out(&self) -> bool {
        self.turns
            .lock()
            .expect("checkpointer poisoned")
            .barriers_out
    }

    /// Every partition of the rerouted stage completed its reroute: the next
    /// checkpoint may be requested.
    pub(crate) fn end_reroute(&self) {
        self.turns.lock().expect("checkpointer poisoned").rerouting = false;
        self.wake.notify_one();
    }

    /// The bookkeeping restored for each partition of `stage` (peeked before
    /// any activation takes it: the plan's routing tables come from it).
    pub(crate) fn restored_metas(&self, stage: u32) -> Vec<Vec<u8>> {
        self.restore
            .lock()
            .expect("checkpointer poisoned")
            .range((stage, 0)..=(stage, u32::MAX))
            .map(|(_, restored)| restored.meta.clone())
            .collect()
    }

    /// The part restored for `actor`, once (its first activation).
    pub(crate) fn take_restore(&self, actor: ActorKey) -> Option<Restored> {
        self.restore
            .lock()
            .expect("checkpointer poisoned")
            .remove(&actor)
    }

    /// Stop the thread (after the commit it may be in) and wait for it: from
    /// then on no manifest is committed and no output appended for this job
    /// (a chunk write a shard started may still land; no manifest refers to
    /// it, and the next start deletes it).
    pub(crate) fn stop(&self) {
        self.inbox.lock().expect("checkpointer poisoned").stop = true;
        self.wake.notify_one();
        let thread = self.thread.lock().expect("checkpointer poisoned").take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// The final manifest is committed (every output holds all its rows).
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// An error that ends the job (output could not be made durable). Over
    /// nodes, once the other nodes were told (see `nodes`): the job is
    /// retired when its handle sees it, and a message for it sent after
    /// that is dropped.
    pub fn error(&self) -> Option<String> {
        if self.role != Role::Alone && !self.told.load(Ordering::Acquire) {
            return None;
        }
        self.failure()
    }

    /// The error that ends the job, told or not.
    fn failure(&self) -> Option<String> {
        self.error.lock().expect("checkpointer poisoned").clone()
    }

    pub fn stats(&self) -> CheckpointStats {
        let mut stats = self.stats.lock().expect("checkpointer poisoned").clone();
        stats.replay_steps = self.replay_steps.load(Ordering::Relaxed);
        stats
    }

    /// A stage or sink needs another step to hand back what it held.
    pub(crate) fn note_replay_step(&self) {
        self.replay_steps.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn fail_job(&self, message: String) {
        self.error
            .lock()
            .expect("checkpointer poisoned")
            .get_or_insert(message);
    }

    fn note_failure(&self, epoch: u64, message: &str) {
        eprintln!(
            "warning: checkpoint {epoch} of {} failed: {message}",
            self.shape.job
        );
        let mut stats = self.stats.lock().expect("checkpointer poisoned");
        stats.failed += 1;
        stats.last_error = Some(format!("checkpoint {epoch}: {message}"));
    }

    /// A write trouble outside any checkpoint: warned and kept as the last
    /// error.
    fn note_trouble(&self, message: &str) {
        eprintln!("warning: {}: {message}", self.shape.job);
        let mut stats = self.stats.lock().expect("checkpointer poisoned");
        stats.last_error = Some(message.to_string());
    }

    /// The checkpointer's thread.
    fn run(&self, mut committed: Committed, actors: Vec<ActorKey>, sources: Vec<ActorKey>) {
        let mut next_epoch = self.first_epoch;
        let mut in_flight: Option<(u64, Instant, BTreeMap<ActorKey, Part>)> = None;
        // Actors that had ended at the restored checkpoint stand as they were
        // (their groups are in the table already).
        let mut finals: BTreeMap<ActorKey, Part> = BTreeMap::new();
        for &key in &self.ended {
            let meta = committed
                .table
                .get(&key)
                .map(|t| t.0.clone())
                .unwrap_or_default();
            finals.insert(
                key,
                Part {
                    actor: key,
                    seq: 0,
                    epoch: 0,
                    kind: PartKind::Final,
                    meta,
                    groups: Groups::none(),
                    sealed: Vec::new(),
                    alignment_ns: None,
                },
            );
        }
        // Chunk writes on the shards not reported yet, by actor and epoch: no
        // checkpoint commits while any is out (it may hold groups an actor no
        // longer marks changed).
        let mut writing: BTreeSet<(ActorKey, u64)> = BTreeSet::new();
        // Changed groups and sealed output of checkpoints that did not commit.
        let mut carry: Carry = Carry::default();
        // Sealed output that belongs after the checkpoint in flight.
        let mut later: Vec<(PathBuf, StagedRef)> = Vec::new();
        // Final commits that failed in a row.
        let mut final_failures = 0u32;
        let mut next_request = Instant::now() + self.interval;
        // The newest epoch requested and the actors that reported for it
        // (any kind of part): once all have, no actor aligns for it (or an
        // older one) any more; a barrier of it still in a channel is stale
        // where it arrives and ignored.
        let mut newest = 0u64;
        let mut reported: BTreeSet<ActorKey> = BTreeSet::new();
        let timeout = (self.interval * CHECKPOINT_TIMEOUT_INTERVALS).max(Duration::from_secs(10));
        loop {
            let (parts, written) = {
                let mut inbox = self.inbox.lock().expect("checkpointer poisoned");
                if inbox.parts.is_empty() && inbox.written.is_empty() && !inbox.stop {
                    let wait = next_request
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50));
                    inbox = self
                        .wake
                        .wait_timeout(inbox, wait)
                        .expect("checkpointer poisoned")
                        .0;
                }
                if inbox.stop {
                    return;
                }
                (
                    std::mem::take(&mut inbox.parts),
                    std::mem::take(&mut inbox.written),
                )
            };
            for mut part in parts {
                if part.epoch == newest {
                    reported.insert(part.actor);
                }
                if matches!(part.groups, Groups::Writing) {
                    writing.insert((part.actor, part.epoch));
                }
                // Sealed output is made durable as it arrives, so that staged
                // files are appended in the order their sinks sealed them. A
                // final part of a sink already cut in the checkpoint in flight
                // holds rows after that cut: they wait for the checkpoint after.
                let sealed = std::mem::take(&mut part.sealed);
                let after_cut = matches!(part.kind, PartKind::Final)
                    && in_flight
                        .as_ref()
                        .is_some_and(|f| f.2.contains_key(&part.actor));
                if after_cut {
                    later.extend(carry.finish_into(sealed, self));
                } else {
                    carry.finish_sealed(sealed, self);
                }
                match part.kind {
                    // Its groups go into every checkpoint it stands in for.
                    PartKind::Final => {
                        finals.insert(part.actor, part);
                    }
                    PartKind::Passed => {}
                    PartKind::Declined(ref reason) => {
                        if let Some((epoch, _, received)) = in_flight.take_if(|f| f.0 == part.epoch)
                        {
                            self.note_failure(epoch, reason);
                            received.into_values().for_each(|p| carry.absorb(p, self));
                        }
                    }
                    PartKind::Regular => match &mut in_flight {
                        Some((epoch, _, received)) if *epoch == part.epoch => {
                            if let Some(old) = received.insert(part.actor, part) {
                                carry.absorb(old, self);
                            }
                        }
                        // A part of an abandoned checkpoint: keep what it changed.
                        _ => carry.absorb(part, self),
                    },
                }
            }
            // Staged rows a full disk held up are durable now, but late: the
            // checkpoint in flight fails and the next one takes them.
            for retried in std::mem::take(&mut carry.retried) {
                match in_flight.take() {
                    Some((epoch, _, received)) => {
                        self.note_failure(epoch, &format!("staging output: {retried}"));
                        received.into_values().for_each(|p| carry.absorb(p, self));
                    }
                    // Final rows, sealed with no checkpoint in flight.
                    None => self.note_trouble(&format!("staging output: {retried}")),
                }
            }
            for done in written {
                writing.remove(&(done.actor, done.epoch));
                let groups = match done.result {
                    Ok(refs) => Groups::At(refs),
                    Err((error, bytes)) => {
                        // The chunk did not make it: this checkpoint fails, its
                        // groups go into the next one.
                        if let Some((epoch, _, received)) = in_flight.take_if(|f| f.0 == done.epoch)
                        {
                            self.note_failure(epoch, &error);
                            received.into_values().for_each(|p| carry.absorb(p, self));
                        }
                        Groups::Encoded(bytes)
                    }
                };
                let in_this = in_flight
                    .as_mut()
                    .filter(|f| f.0 == done.epoch)
                    .and_then(|f| f.2.get_mut(&done.actor));
                match in_this {
                    Some(part) => part.groups = groups,
                    // Of a checkpoint given up: keep what it changed.
                    None => carry.put_groups(done.actor, done.epoch, groups),
                }
            }
            if actors
                .iter()
                .all(|a| reported.contains(a) || finals.contains_key(a))
            {
                self.turns
                    .lock()
                    .expect("checkpointer poisoned")
                    .barriers_out = false;
            }
            let all_final = actors.iter().all(|a| finals.contains_key(a));
            if let Some((epoch, started, received)) = &in_flight {
                let complete = writing.is_empty()
                    && actors
                        .iter()
                        .all(|a| received.contains_key(a) || finals.contains_key(a));
                if complete {
                    let (epoch, started, received) = in_flight.take().expect("in flight");
                    let cut: HashSet<ActorKey> = received.keys().copied().collect();
                    let ok = self.commit(
                        &mut committed,
                        epoch,
                        started,
                        received,
                        &finals,
                        &mut carry,
                        false,
                    );
                    if ok {
                        // The final parts that stood in are in the table now:
                        // later checkpoints refer to their groups without
                        // writing them again. (One whose actor was cut here by
                        // its regular part is still to be taken.)
                        for (key, part) in finals.iter_mut() {
                            if !cut.contains(key) {
                                part.groups = Groups::none();
                            }
                        }
                    }
                } else if started.elapsed() > timeout {
                    let epoch = *epoch;
                    self.note_failure(epoch, &format!("not complete after {timeout:?}"));
                    let (_, _, received) = in_flight.take().expect("in flight");
                    received.into_values().for_each(|p| carry.absorb(p, self));
                }
            }
            if in_flight.is_none() {
                for (path, staged) in later.drain(..) {
                    carry.staged.entry(path).or_default().push(staged);
                }
            }
            if self.failure().is_some() {
                return;
            }
            if in_flight.is_none() && all_final && writing.is_empty() {
                let epoch = next_epoch;
                let ok = self.commit(
                    &mut committed,
                    epoch,
                    Instant::now(),
                    BTreeMap::new(),
                    &finals,
                    &mut carry,
                    true,
                );
                next_epoch += 1;
                if ok {
                    // Told before it shows: the handle that sees it retires
                    // the job, and a message for it after that is dropped.
                    self.tell_finished();
                    self.finished.store(true, Ordering::Release);
                    return;
                }
                final_failures += 1;
                if final_failures >= FINAL_COMMIT_TRIES {
                    let last = self.stats().last_error.unwrap_or_default();
                    self.fail_job(format!(
                        "the final checkpoint could not be committed in {FINAL_COMMIT_TRIES} \
                         tries ({last}); rerunning resumes from the last committed one"
                    ));
                    return;
                }
                std::thread::sleep(self.interval.min(Duration::from_millis(200)));
                continue;
            }
            let sources_done = sources.iter().all(|s| finals.contains_key(s));
            if in_flight.is_none()
                && !sources_done
                && Instant::now() >= next_request
                && self.may_request()
            {
                let mut turns = self.turns.lock().expect("checkpointer poisoned");
                // While a reroute is under way the request waits (the loop
                // looks again in 2 ms).
                if !turns.rerouting {
                    let epoch = next_epoch;
                    next_epoch += 1;
                    turns.barriers_out = true;
                    newest = epoch;
                    reported.clear();
                    in_flight = Some((epoch, Instant::now(), BTreeMap::new()));
                    self.requested.store(epoch, Ordering::Release);
                    drop(turns);
                    // Not under the lock: a send may wait for room, and a
                    // monitor takes the lock at a reroute's end.
                    self.tell_requested(epoch);
                    next_request = Instant::now() + self.interval;
                } else {
                    next_request = Instant::now() + Duration::from_millis(2);
                }
            }
        }
    }

    /// Write and commit checkpoint `epoch` from `received` (and the final parts
    /// of actors that sent none); `true` if it committed.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        committed: &mut Committed,
        epoch: u64,
        started: Instant,
        received: BTreeMap<ActorKey, Part>,
        finals: &BTreeMap<ActorKey, Part>,
        carry: &mut Carry,
        finished: bool,
    ) -> bool {
        // Fold this checkpoint's parts into the carry: from here on what has to
        // be written is the carry, whatever failed before included.
        // An actor that sent a part of this epoch is cut there; one that did
        // not has ended, and its final part stands for it.
        let mut metas: BTreeMap<ActorKey, Vec<u8>> = BTreeMap::new();
        let mut ended: HashSet<ActorKey> = HashSet::new();
        let mut alignment = Vec::new();
        for (key, part) in finals {
            if !received.contains_key(key) {
                metas.insert(*key, part.meta.clone());
                // The newest an actor can hand over: tagged above every epoch.
                carry.put_groups(*key, u64::MAX, part.groups.clone_encoded());
                ended.insert(*key);
            }
        }
        for (key, part) in received {
            metas.insert(key, part.meta.clone());
            alignment.extend(part.alignment_ns);
            carry.absorb(part, self);
        }
        if self.failure().is_some() {
            return false;
        }
        let mut table = committed.table.clone();
        let mut written = 0u64;
        for (key, groups) in &carry.groups {
            // What the shards wrote already, and what is left to write here.
            let to_write: Vec<(u32, &[u8])> = groups
                .iter()
                .filter_map(|(&g, (_, data))| match data {
                    GroupData::Bytes(bytes) if !bytes.is_empty() => Some((g, bytes.as_slice())),
                    _ => None,
                })
                .collect();
            let mut refs = if to_write.is_empty() {
                Vec::new().into_iter()
            } else {
                let name = format!("chunk-{epoch}-{}-{}", key.0, key.1);
                let bytes: Vec<&[u8]> = to_write.iter().map(|(_, b)| *b).collect();
                match self.store.write_chunk(&name, &bytes) {
                    Ok(refs) => refs.into_iter(),
                    Err(e) => {
                        self.note_failure(epoch, &e.to_string());
                        return false;
                    }
                }
            };
            let entry = table.entry(*key).or_default();
            for (&group, (_, data)) in groups {
                let at = match data {
                    GroupData::Bytes(bytes) if bytes.is_empty() => None,
                    GroupData::Bytes(bytes) => {
                        written += bytes.len() as u64;
                        Some(refs.next().expect("one ref per part written"))
                    }
                    GroupData::At(at) => {
                        written += at.as_ref().map_or(0, |r| r.len as u64);
                        at.clone()
                    }
                };
                match at {
                    None => {
                        entry.1.remove(&group);
                    }
                    Some(part) => {
                        entry.1.insert(
                            group,
                            GroupRef {
                                group,
                                file: part.file,
                                offset: part.offset,
                                len: part.len,
                                crc: part.crc,
                            },
                        );
                    }
                }
            }
        }
        for (key, meta) in metas {
            table.entry(key).or_default().0 = meta;
        }
        // Every output known, with or without rows this time: its length must
        // survive in the newest manifest.
        let mut paths: Vec<&PathBuf> = committed.out_len.keys().collect();
        paths.extend(
            carry
                .staged
                .keys()
                .filter(|p| !committed.out_len.contains_key(*p)),
        );
        let mut outputs = Vec::new();
        for path in paths {
            let staged = carry.staged.get(path).map_or(&[][..], |s| s.as_slice());
            let len_before = committed.out_len.get(path).copied().unwrap_or(0);
            outputs.push(OutputEntry {
                path: path.display().to_string(),
                len_before,
                staged: staged
                    .iter()
                    .map(|s| StagedEntry {
                        file: s.file.clone(),
                        len: s.len,
                        crc: s.crc,
                    })
                    .collect(),
            });
        }
        let manifest = Manifest {
            shape: self.shape.clone(),
            epoch,
            finished,
            actors: table
                .iter()
                .map(|(&(stage, partition), (meta, groups))| ActorEntry {
                    stage,
                    partition,
                    ended: ended.contains(&(stage, partition)),
                    meta: meta.clone(),
                    groups: groups.values().cloned().collect(),
                })
                .collect(),
            outputs,
        };
        let body = crate::actor::encode_state(&manifest);
        // A later placement of the job took the directory over: this run
        // commits nothing more (it may still be going only because its node
        // stalled past its lease).
        if let Some((dir, placement)) = &self.fence {
            match self.store.fence().map_err(|e| e.to_string()) {
                Ok(Some(holder)) if holder > *placement => {
                    self.fail_job(format!(
                        "fenced: placement {holder} has taken {} over (this run is placement \
                         {placement}); checkpoint {epoch} not committed",
                        dir.display()
                    ));
                    return false;
                }
                Ok(_) => {}
                Err(e) => {
                    self.note_failure(epoch, &e);
                    return false;
                }
            }
        }
        if let Err(e) = self.store.commit_manifest(epoch, &body) {
            self.note_failure(epoch, &e.to_string());
            return false;
        }
        // Committed: from here the manifest is what a restart resumes from.
        for output in &manifest.outputs {
            let staged: Vec<StagedRef> = output.staged.iter().map(|s| s.staged()).collect();
            match self
                .store
                .append_output(Path::new(&output.path), output.len_before, &staged)
            {
                Ok(len) => {
                    committed.out_len.insert(PathBuf::from(&output.path), len);
                }
                Err(e) => {
                    self.fail_job(format!(
                        "appending checkpoint {epoch}'s rows to {}: {e}",
                        output.path
                    ));
                    return false;
                }
            }
        }
        carry.groups.clear();
        carry.staged.clear();
        committed.table = table;
        committed.kept.push_back(manifest);
        let mut dropped = VecDeque::new();
        while committed.kept.len() > MANIFESTS_KEPT {
            dropped.extend(committed.kept.pop_front());
        }
        let (live_chunks, live_staged) = live_files(&committed.kept);
        let keep: Vec<u64> = committed.kept.iter().map(|m| m.epoch).collect();
        // Sinks are writing staged files of checkpoints to come: only those of
        // dropped manifests go.
        let (_, dropped_staged) = live_files(&dropped);
        let dead: Vec<String> = dropped_staged
            .into_iter()
            .filter(|f| !live_staged.contains(f))
            .collect();
        let cleaned = self
            .store
            .retain(&keep, &live_chunks, None)
            .and_then(|()| self.store.remove_staged(&dead));
        if let Err(e) = cleaned {
            eprintln!("warning: cleaning old checkpoints: {e}");
        }
        let mut stats = self.stats.lock().expect("checkpointer poisoned");
        stats.completed += 1;
        stats.last_epoch = epoch;
        let _ = stats
            .checkpoint_ms
            .record(started.elapsed().as_millis().max(1) as u64);
        for ns in alignment {
            let _ = stats.alignment_us.record((ns / 1000).max(1));
        }
        stats.incremental_bytes = written;
        stats.written_bytes += written;
        stats.state_bytes = state_bytes(&committed.table);
        true
    }
}

/// A changed key group as the next commit takes it.
enum GroupData {
    /// To write (empty: the group emptied).
    Bytes(Vec<u8>),
    /// Written on a shard already (`None`: the group emptied).
    At(Option<PartRef>),
}

/// What has to go into the next checkpoint that commits.
#[derive(Default)]
struct Carry {
    /// Per actor and group, the newest change: `(epoch, data)`; a change of an
    /// older epoch (a late shard write of a checkpoint given up) never
    /// replaces a newer one.
    groups: BTreeMap<ActorKey, BTreeMap<u32, (u64, GroupData)>>,
    staged: BTreeMap<PathBuf, Vec<StagedRef>>,
    /// Staged writes that had to be tried again since the last look.
    retried: Vec<String>,
}

impl Carry {
    /// Take a part's changed groups and make its sealed output durable.
    fn absorb(&mut self, part: Part, checkpointer: &Checkpointer) {
        self.put_groups(part.actor, part.epoch, part.groups);
        self.finish_sealed(part.sealed, checkpointer);
    }

    fn finish_sealed(&mut self, sealed: Vec<Sealed>, checkpointer: &Checkpointer) {
        for (output, staged) in self.finish_into(sealed, checkpointer) {
            self.staged.entry(output).or_default().push(staged);
        }
    }

    /// Make sealed output durable; what it staged, in order.
    fn finish_into(
        &mut self,
        sealed: Vec<Sealed>,
        checkpointer: &Checkpointer,
    ) -> Vec<(PathBuf, StagedRef)> {
        let mut staged = Vec::new();
        for sealed in sealed {
            match (sealed.finish)() {
                Ok(file) => {
                    self.retried.extend(file.retried);
                    staged.push((sealed.output, file.staged));
                }
                Err(e) => checkpointer.fail_job(format!(
                    "staging output for {}: {e}",
                    sealed.output.display()
                )),
            }
        }
        staged
    }

    fn put_groups(&mut self, actor: ActorKey, epoch: u64, groups: Groups) {
        let entry = self.groups.entry(actor).or_default();
        let mut put = |group: u32, data: GroupData| match entry.get(&group) {
            Some((newer, _)) if *newer > epoch => {}
            _ => {
                entry.insert(group, (epoch, data));
            }
        };
        match groups {
            Groups::Encoded(groups) => {
                for (group, bytes) in groups {
                    put(group, GroupData::Bytes(bytes));
                }
            }
            Groups::At(refs) => {
                for (group, at) in refs {
                    put(group, GroupData::At(at));
                }
            }
            // Its `Written` report brings them.
            Groups::Writing => {}
        }
    }
}

impl Groups {
    /// A copy of encoded groups (a final part's, taken into every checkpoint
    /// it stands in for).
    fn clone_encoded(&self) -> Groups {
        match self {
            Groups::Encoded(groups) => Groups::Encoded(groups.clone()),
            Groups::At(refs) => Groups::At(refs.clone()),
            Groups::Writing => Groups::Writing,
        }
    }
}

fn state_bytes(table: &BTreeMap<ActorKey, (Vec<u8>, BTreeMap<u32, GroupRef>)>) -> u64 {
    table
        .values()
        .flat_map(|(_, groups)| groups.values())
        .map(|g| g.len as u64)
        .sum()
}

fn live_files(kept: &VecDeque<Manifest>) -> (HashSet<String>, HashSet<String>) {
    let mut chunks = HashSet::new();
    let mut staged = HashSet::new();
    for manifest in kept {
        for actor in &manifest.actors {
            for group in &actor.groups {
                chunks.insert(group.file.clone());
            }
        }
        for output in &manifest.outputs {
            for s in &output.staged {
                staged.insert(s.file.clone());
            }
        }
    }
    (chunks, staged)
}

enum LoadError {
    /// The checkpoint is of another job: not a fallback, an error.
    Mismatch(String),
    Corrupt(String),
}

type Loaded = (Manifest, Vec<Vec<(u32, Vec<u8>)>>);

/// Read manifest `epoch` and every group and staged file it refers to.
fn load(store: &CheckpointDir, epoch: u64, shape: &Shape) -> Result<Loaded, LoadError> {
    let manifest = read_manifest(store, epoch).map_err(LoadError::Corrupt)?;
    if manifest.epoch != epoch {
        return Err(LoadError::Corrupt(format!(
            "manifest {epoch} says it is checkpoint {}",
            manifest.epoch
        )));
    }
    if manifest.shape != *shape {
        return Err(LoadError::Mismatch(describe_mismatch(
            &manifest.shape,
            shape,
        )));
    }
    let mut parts = Vec::with_capacity(manifest.actors.len());
    for actor in &manifest.actors {
        let refs: Vec<PartRef> = actor.groups.iter().map(|g| g.part()).collect();
        let bytes = store
            .read_parts(&refs)
            .map_err(|e| LoadError::Corrupt(e.to_string()))?;
        parts.push(
            actor
                .groups
                .iter()
                .map(|g| g.group)
                .zip(bytes)
                .collect::<Vec<_>>(),
        );
    }
    for output in &manifest.outputs {
        for s in &output.staged {
            store
                .verify_staged(&s.file, s.len, s.crc)
                .map_err(|e| LoadError::Corrupt(e.to_string()))?;
        }
    }
    Ok((manifest, parts))
}

fn describe_mismatch(saved: &Shape, now: &Shape) -> String {
    if saved.job != now.job {
        return format!(
            "the data directory holds job {:?}, not {:?}",
            saved.job, now.job
        );
    }
    if saved.key_groups != now.key_groups {
        return format!(
            "the data directory's job has {} key groups, this one {}",
            saved.key_groups, now.key_groups
        );
    }
    let names = |s: &Shape| {
        s.stages
            .iter()
            .map(|(n, p)| format!("{n}x{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "the data directory's job has stages [{}], this one [{}]",
        names(saved),
        names(now)
    )
}

/// Exactly-once output for a sink partition: rows go to a staged file of the
/// data directory (through a spool thread, so the shard makes no write or
/// open call), one file per checkpoint; [`StagedOutput::seal`] hands the
/// current file over as a [`Sealed`], whose rows reach `output` only when that
/// checkpoint commits.
pub struct StagedOutput {
    store: CheckpointDir,
    output: PathBuf,
    prefix: String,
    sealed: u64,
    current: Option<(Spool, Arc<Mutex<LazyStaged>>)>,
}

/// The staged file a spool writes, created on the spool's thread at its first
/// write.
struct LazyStaged {
    store: CheckpointDir,
    name: String,
    writer: Option<StagedWriter>,
}

impl LazyStaged {
    fn writer(&mut self) -> std::io::Result<&mut StagedWriter> {
        if self.writer.is_none() {
            let writer = self
                .store
                .staged_writer(&self.name)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.writer = Some(writer);
        }
        Ok(self.writer.as_mut().expect("made above"))
    }
}

/// What the spool writes through.
struct SharedStaged(Arc<Mutex<LazyStaged>>);

impl std::io::Write for SharedStaged {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("staged lock").writer()?.write(bytes)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.0.lock().expect("staged lock").writer {
            Some(writer) => writer.flush(),
            None => Ok(()),
        }
    }
}

impl StagedOutput {
    /// Staged output for `output`; `name` tells this partition's files apart
    /// (e.g. `sink-3`): each file is `<name>-<process>-<n>`, so a rerun never
    /// reuses a name a kept checkpoint refers to.
    pub fn new(data_dir: &Path, output: PathBuf, name: &str) -> Result<StagedOutput, String> {
        let store = CheckpointDir::open(data_dir).map_err(|e| e.to_string())?;
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(StagedOutput {
            store,
            output,
            prefix: format!("{name}-{}-{run:x}", std::process::id()),
            sealed: 0,
            current: None,
        })
    }

    /// The same output with `faults` armed on its staged files (tests).
    pub fn with_faults(self, faults: Faults) -> StagedOutput {
        StagedOutput {
            store: self.store.with_faults(faults),
            ..self
        }
    }

    /// Stage `bytes` (whole lines) for the current checkpoint.
    pub fn write(&mut self, bytes: &[u8]) {
        let (spool, _) = self.current.get_or_insert_with(|| {
            let lazy = Arc::new(Mutex::new(LazyStaged {
                store: self.store.clone(),
                name: format!("{}-{}", self.prefix, self.sealed),
                writer: None,
            }));
            let out: Box<dyn std::io::Write + Send> = Box::new(SharedStaged(lazy.clone()));
            let target = format!("staged output for {}", self.output.display());
            (Spool::new(out, &target, SPOOL_BUFFERS_MAX), lazy)
        });
        let mut buffer = spool.buffer();
        buffer.extend_from_slice(bytes);
        spool.write(buffer);
    }

    /// Everything staged since the last seal, as one [`Sealed`] (none if
    /// nothing was written).
    pub fn seal(&mut self) -> Vec<Sealed> {
        let Some((mut spool, lazy)) = self.current.take() else {
            return Vec::new();
        };
        self.sealed += 1;
        vec![Sealed {
            output: self.output.clone(),
            finish: Box::new(move || {
                spool.finish()?;
                let writer = lazy.lock().expect("staged lock").writer.take();
                let writer = writer.ok_or("a staged file was sealed before it was made")?;
                let retried = writer.retried();
                let staged = writer.finish().map_err(|e| e.to_string())?;
                Ok(SealedFile { staged, retried })
            }),
        }]
    }
}

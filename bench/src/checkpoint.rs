//! `dirigo bench checkpoint`: what taking checkpoints costs a stateful job, how
//! long it takes to come back from one, and proof that the resumed job lost and
//! duplicated nothing.
//!
//! The job: a replayable source of events (event `n` carries a key; its
//! position is the next event number, `seek` sets it; partition `p` of `P`
//! produces `n = p, p + P, ...`) keyed into a count stage whose state is a
//! running count per key, kept by the engine's key groups
//! (`KeyGroups<CountGroup>`), and a counting sink. One partition of each per
//! core.
//!
//! - **load phase**: event `n < keys` has key `n`, so every key exists once the
//!   load is through (`keys` entries, 16 encoded bytes each).
//! - **steady phase**: event `n >= keys` draws its key (a hash of `n`) from a
//!   hot set: the keys of 1/16 of the key groups (groups `g` with
//!   `g % 16 == 0`, spread over the partitions), so a checkpoint changes only
//!   some groups and an incremental checkpoint writes a fraction of the state.
//!
//! Phases, each on a fresh engine with one shard per core:
//!
//! 1. **without** checkpoints (B) and 2. **with** a checkpoint every second (C),
//!    alternated B, C, B, C. Each run starts the job, waits for the load phase
//!    to be through (every source partition past event `keys`), and then counts
//!    the events the count stage handles in a window of `seconds` of wall time:
//!    both kinds of run measure a rate over the same wall time (not a fixed
//!    event count). A C run opens its window only once a checkpoint requested
//!    after the load phase has committed, so the window holds steady-state
//!    (incremental) checkpoints, not the full ones of the load phase; those
//!    count in `checkpoint_ms_max_all`. Each rate is the median of its two
//!    runs; the checkpoint figures are over the checkpoints that completed in
//!    the windows of both C runs (histograms of the window: the job's at its
//!    end less the job's at its start).
//! 3. **recovery**: the second C run is stopped mid-run (the engine shut down
//!    with at least two checkpoints committed). A fresh engine resumes the same
//!    job from its data directory, now bounded to end at an event count a little
//!    past where the stopped run's sources stood. `recovery_ms` runs from just
//!    before `Dataflow::start` until every count partition has handled a record
//!    (its state restored first: the engine restores a partition's groups when
//!    it activates it). At the end of its input the count stage emits
//!    `(key, count)` for every key; the sink adds them up by key, and they are
//!    compared with the counts of events `0..end` computed in a plain loop:
//!    `lost` and `duplicated` are what is missing and what is over.
//!
//! The group encoding is one rkyv `Vec<(u64, u64)>` per group (one
//! `rkyv::to_bytes` call; decoding is validated `rkyv::from_bytes`), not the
//! per-value framing of `state.rs`. No figure fails the command: the targets are
//! shown next to the figures for information.
//!
//! On a shared machine the rates move from run to run by more than checkpoints
//! cost, so each window also says what disturbed it and what the checkpoints
//! themselves took, all measured in the window:
//!
//! - the share of the machine's CPU other processes used (`/proc/stat` less
//!   this process's own time), and the shards' turns over 10 ms
//!   (`RuntimeStats::stalls`);
//! - events per CPU second of this process (every thread);
//! - the CPU checkpoints took: the time spent in `CountGroup::encode` on the
//!   shards, and the checkpointer thread's CPU time (`/proc/self/task`), per
//!   checkpoint and as a share of the process's CPU;
//! - for alignment, how far apart the source partitions injected each barrier
//!   (the engine takes a source's position, `Source::position`, exactly then).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use dirigo_engine::dataflow::checkpoint::{CheckpointOptions, CheckpointStats};
use dirigo_engine::dataflow::state::{GroupState, KeyGroups, Stateful};
use dirigo_engine::dataflow::{
    key_group, Dataflow, DataflowConfig, Job, JobHandle, Operator, Sink, Source, SourceBatch,
    END_OF_INPUT, KEY_GROUPS_DEFAULT,
};
use dirigo_engine::ids::{mix64, IdMap};

use crate::machine::Machine;
use crate::{median, progress, BenchError};

/// Key groups of the job (the engine's default, stated).
const KEY_GROUPS: u32 = KEY_GROUPS_DEFAULT;
/// One key group in this many is hot in the steady phase.
const HOT_EVERY: u32 = 16;
/// Baseline and checkpointed runs, alternated (B, C, B, C).
const PAIRS: usize = 2;

pub const NOTE: &str = "both kinds of run are measured over the same wall time after the load \
phase (rates compared, not a fixed event count); a checkpointed run's window opens once a \
checkpoint requested after the load phase has committed, so the full checkpoints of the load \
phase are outside it (see checkpoint_ms_max_all); state_bytes and checkpoint_bytes are both the \
encoded state the newest manifest refers to, i.e. the size of a full checkpoint; the resumed \
run reads the checkpoint files from the page cache (written seconds before), not from a cold \
disk";

#[derive(Clone, Debug)]
pub struct Config {
    /// Keys of the count: the entries of its state.
    pub keys: u64,
    /// Wall time of each throughput window.
    pub seconds: f64,
    /// Shards, and partitions of every stage.
    pub cores: usize,
    /// Checkpoint interval of the checkpointed runs.
    pub interval: Duration,
    pub progress: bool,
    /// A phase that has not got where it must after this long is an error.
    pub time_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keys: 7_000_000,
            seconds: 6.0,
            cores: dirigo_engine::runtime::online_cores(),
            interval: Duration::from_secs(1),
            progress: true,
            time_max: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub keys: u64,
    pub seconds: f64,
    pub throughput_ratio: f64,
    /// Events the count stage handled per second in the window, median of the
    /// baseline runs, and of the checkpointed runs.
    pub events_per_s_without: f64,
    pub events_per_s_with: f64,
    pub events_per_s_without_samples: Vec<f64>,
    pub events_per_s_with_samples: Vec<f64>,
    /// Events per CPU second of this process (every thread: shards and the
    /// checkpointer) in the window, medians, and their ratio with/without. It
    /// is not spared the machine's noise either (another virtual machine on the
    /// same host slows each instruction without taking a core from this one).
    pub events_per_cpu_s_without: f64,
    pub events_per_cpu_s_with: f64,
    pub cpu_efficiency_ratio: f64,
    /// Share of the machine's CPU time that other processes used (steal
    /// included) during each window, from `/proc/stat` less this process's own:
    /// how much a sample was disturbed.
    pub others_cpu_without_samples: Vec<f64>,
    pub others_cpu_with_samples: Vec<f64>,
    /// Turns of the shards that took over 10 ms in each window
    /// (`RuntimeStats::stalls`): the OS took a core from a shard, or one turn did
    /// that much work.
    pub stalls_without_samples: Vec<u64>,
    pub stalls_with_samples: Vec<u64>,
    /// Request to commit, over the checkpoints of the windows.
    pub checkpoint_ms_p50: u64,
    pub checkpoint_ms_p99: u64,
    /// Over every checkpoint of the checkpointed runs, the load phase's included.
    pub checkpoint_ms_max_all: u64,
    /// First barrier to last at a stage or sink partition, over the windows
    /// (a source's part counts as 0).
    pub alignment_ms_p99: f64,
    pub alignment_ms_p50: f64,
    /// Per checkpoint in the windows: from the first source partition's
    /// barrier to the last (when each took its position), the part of the
    /// alignment that is the sources' turns coming at different times.
    pub barrier_skew_ms_p50: f64,
    pub barrier_skew_ms_max: f64,
    /// Per checkpoint in the windows, the CPU it took: encoding the changed
    /// groups on the shards, and the checkpointer thread (writing, fsync,
    /// manifest); and the two together as a share of this process's CPU in the
    /// windows.
    pub encode_ms_per_checkpoint: f64,
    pub checkpointer_cpu_ms_per_checkpoint: f64,
    pub checkpoint_cpu_share: f64,
    /// Checkpoints that completed in the windows.
    pub window_checkpoints: u64,
    /// Encoded state the newest manifest of the last checkpointed run refers to.
    pub state_bytes: u64,
    /// The size of a full checkpoint (= `state_bytes`).
    pub checkpoint_bytes: u64,
    /// Bytes written by the newest checkpoint of the last checkpointed run.
    pub incremental_bytes: u64,
    /// Bytes written per checkpoint, mean over the windows.
    pub incremental_bytes_mean: u64,
    /// Bytes written per checkpoint, mean over whole checkpointed runs (the
    /// load phase's full checkpoints included): `written_bytes / completed`.
    pub incremental_bytes_mean_all: u64,
    /// Files in the data directory after the last checkpointed run stopped.
    pub disk_bytes: u64,
    /// Over both checkpointed runs, whole runs.
    pub checkpoints_completed: u64,
    pub checkpoints_failed: u64,
    pub last_checkpoint_error: Option<String>,
    /// Seconds from submission until every source partition was past the load
    /// phase, median of the baseline runs and of the checkpointed runs.
    pub load_s_without: f64,
    pub load_s_with: f64,
    /// Just before `Dataflow::start` to every count partition having handled a
    /// record after its restore.
    pub recovery_ms: f64,
    /// ... to the first count partition having handled one.
    pub recovery_first_ms: f64,
    /// ... to `Dataflow::start` returned, and to `submit` returned (it opens
    /// the data directory and reads and checks every chunk of the manifest).
    pub recovery_start_ms: f64,
    pub recovery_submit_ms: f64,
    pub restored_epoch: u64,
    /// Events of the resumed run's input (`0..end`), and what its count stage
    /// handled after the restore (the replay from the checkpoint included).
    pub recovery_end_event: u64,
    pub recovery_events_handled: u64,
    /// Summed over keys: expected count - counted, where positive (lost), and
    /// counted - expected, where positive (duplicated).
    pub lost: u64,
    pub duplicated: u64,
    pub note: &'static str,
}

// ---- the workload ------------------------------------------------------------

/// One event: a key.
#[derive(Clone, Copy, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Event {
    pub key: u64,
}

/// What event `n` is.
struct Workload {
    keys: u64,
    /// Keys of the hot key groups, ascending.
    hot: Vec<u64>,
}

impl Workload {
    fn new(keys: u64) -> Self {
        let hot = (0..keys)
            .filter(|&k| key_group(k, KEY_GROUPS).is_multiple_of(HOT_EVERY))
            .collect();
        Workload { keys, hot }
    }

    #[inline]
    fn key(&self, n: u64) -> u64 {
        if n < self.keys {
            n
        } else {
            self.hot[(mix64(n) % self.hot.len() as u64) as usize]
        }
    }
}

/// A counter on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// What the job's partitions tell the bench thread.
struct Probe {
    origin: Instant,
    /// Per count partition: events handled.
    handled: Box<[Padded]>,
    /// Per count partition: ns from `origin` to the end of its first batch,
    /// plus 1 (0: none yet).
    first_ns: Box<[Padded]>,
    /// Per source partition: the next event number.
    positions: Box<[Padded]>,
    /// Per source partition: ns from `origin` at each `Source::position` call.
    /// The engine takes a source's position exactly when the partition injects
    /// a checkpoint's barrier (and once at its end), so the n-th call of every
    /// partition is the same checkpoint's barrier.
    injected_ns: Box<[Mutex<Vec<u64>>]>,
    /// The counts emitted at the end of input, added up by key (recovery only).
    counts: Option<Mutex<Vec<u64>>>,
    /// Counts of keys outside `0..keys`.
    stray: AtomicU64,
}

impl Probe {
    fn new(partitions: usize, counts: Option<Vec<u64>>) -> Self {
        let padded = || (0..partitions).map(|_| Padded::default()).collect();
        Probe {
            origin: Instant::now(),
            handled: padded(),
            first_ns: padded(),
            positions: padded(),
            injected_ns: (0..partitions).map(|_| Mutex::default()).collect(),
            counts: counts.map(Mutex::new),
            stray: AtomicU64::new(0),
        }
    }

    fn handled(&self) -> u64 {
        self.handled
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }

    fn positions(&self) -> impl Iterator<Item = u64> + '_ {
        self.positions.iter().map(|c| c.0.load(Ordering::Acquire))
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// For each checkpoint whose first barrier was injected between `from_ns`
    /// and `to_ns`: ns from the first source partition's barrier to the last.
    fn injection_skews(&self, from_ns: u64, to_ns: u64) -> Vec<u64> {
        let calls: Vec<Vec<u64>> = self
            .injected_ns
            .iter()
            .map(|c| c.lock().expect("injections poisoned").clone())
            .collect();
        let epochs = calls.iter().map(Vec::len).min().unwrap_or(0);
        (0..epochs)
            .filter_map(|k| {
                let first = calls.iter().map(|c| c[k]).min()?;
                let last = calls.iter().map(|c| c[k]).max()?;
                (from_ns..=to_ns).contains(&first).then_some(last - first)
            })
            .collect()
    }

    /// `(first, last)` ns from `origin` at which a count partition handled its
    /// first batch, once every one has.
    fn first_records(&self) -> Option<(u64, u64)> {
        let firsts: Vec<u64> = self
            .first_ns
            .iter()
            .map(|c| c.0.load(Ordering::Acquire))
            .collect();
        if firsts.contains(&0) {
            return None;
        }
        let first = firsts.iter().min().copied()? - 1;
        let last = firsts.iter().max().copied()? - 1;
        Some((first, last))
    }
}

/// Partition `p` of `P`: events `p, p + P, ...` below `end`.
struct Events {
    workload: Arc<Workload>,
    probe: Arc<Probe>,
    partition: usize,
    next: u64,
    step: u64,
    end: u64,
}

impl Source<Event> for Events {
    fn next_batch(&mut self, max: usize, out: &mut Vec<Event>) -> SourceBatch {
        let mut status = SourceBatch::More { watermark_ms: 0 };
        for _ in 0..max {
            if self.next >= self.end {
                status = SourceBatch::Done;
                break;
            }
            out.push(Event {
                key: self.workload.key(self.next),
            });
            self.next += self.step;
        }
        self.probe.positions[self.partition]
            .0
            .store(self.next, Ordering::Release);
        status
    }

    fn position(&self) -> Option<Vec<u8>> {
        let now_ns = self.probe.now_ns();
        self.probe.injected_ns[self.partition]
            .lock()
            .expect("injections poisoned")
            .push(now_ns);
        Some(self.next.to_le_bytes().to_vec())
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), String> {
        let bytes: [u8; 8] = position
            .try_into()
            .map_err(|_| format!("a position of {} bytes, not 8", position.len()))?;
        let next = u64::from_le_bytes(bytes);
        if next % self.step != self.partition as u64 {
            return Err(format!(
                "event {next} is not one of partition {} of {}",
                self.partition, self.step
            ));
        }
        self.next = next;
        self.probe.positions[self.partition]
            .0
            .store(next, Ordering::Release);
        Ok(())
    }
}

/// Time spent in `CountGroup::encode` (on the shards, at each checkpoint
/// barrier), all runs together: read as differences.
static ENCODE_NS: AtomicU64 = AtomicU64::new(0);

/// The counts of one key group, encoded in bulk.
#[derive(Default)]
pub struct CountGroup(pub IdMap<u64, u64>);

impl GroupState for CountGroup {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let started = Instant::now();
        let entries: Vec<(u64, u64)> = self.0.iter().map(|(&k, &n)| (k, n)).collect();
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&entries)
            .expect("encoding into memory cannot fail");
        out.extend_from_slice(&bytes);
        ENCODE_NS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let decode = |bytes: &[u8]| {
            rkyv::from_bytes::<Vec<(u64, u64)>, rkyv::rancor::Error>(bytes)
                .map_err(|e| e.to_string())
        };
        // Archived bytes are checked where they lie: copy them to an aligned
        // buffer unless they are aligned already.
        let entries = if (bytes.as_ptr() as usize).is_multiple_of(16) {
            decode(bytes)?
        } else {
            let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
            aligned.extend_from_slice(bytes);
            decode(&aligned)?
        };
        let mut map = IdMap::default();
        map.reserve(entries.len());
        map.extend(entries);
        Ok(CountGroup(map))
    }
}

/// A running count per key; emits `(key, count)` for every key at the end of
/// its input, nothing before.
struct Count {
    state: KeyGroups<CountGroup>,
    partition: usize,
    probe: Arc<Probe>,
    seen: bool,
}

impl Operator<Event, (u64, u64)> for Count {
    fn on_records(&mut self, records: Vec<Event>, _out: &mut Vec<(u64, u64)>) {
        for event in &records {
            *self
                .state
                .for_key(event.key)
                .0
                .entry(event.key)
                .or_insert(0) += 1;
        }
        self.probe.handled[self.partition]
            .0
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        if !self.seen {
            self.seen = true;
            let ns = self.probe.now_ns() + 1;
            let _ = self.probe.first_ns[self.partition].0.compare_exchange(
                0,
                ns,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<(u64, u64)>) {
        if watermark_ms == END_OF_INPUT {
            for (_, group) in self.state.iter() {
                out.extend(group.0.iter().map(|(&key, &n)| (key, n)));
            }
        }
    }

    fn state(&mut self) -> Option<&mut dyn Stateful> {
        Some(&mut self.state)
    }
}

/// Adds the counts it gets up by key, where the probe asks for them.
struct Tally(Arc<Probe>);

impl Sink<(u64, u64)> for Tally {
    fn write(&mut self, records: &[(u64, u64)]) {
        let Some(counts) = &self.0.counts else {
            return;
        };
        let mut counts = counts.lock().expect("counts poisoned");
        for &(key, n) in records {
            match counts.get_mut(key as usize) {
                Some(slot) => *slot += n,
                None => {
                    self.0.stray.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    fn stateless(&self) -> bool {
        true
    }
}

fn job(
    workload: &Arc<Workload>,
    probe: &Arc<Probe>,
    partitions: u32,
    end: u64,
    checkpoints: Option<CheckpointOptions>,
) -> Job {
    let mut job = Job::new("checkpoint-bench", Duration::from_secs(1));
    job.key_groups(KEY_GROUPS);
    if let Some(options) = checkpoints {
        job.checkpoints(options);
    }
    let (workload, source_probe) = (workload.clone(), probe.clone());
    let (count_probe, sink_probe) = (probe.clone(), probe.clone());
    job.source(
        "events",
        partitions,
        Arc::new(move |p, n| {
            Box::new(Events {
                workload: workload.clone(),
                probe: source_probe.clone(),
                partition: p as usize,
                next: p as u64,
                step: n as u64,
                end,
            })
        }),
    )
    .key_by(|e: &Event| e.key)
    .process(
        "count",
        partitions,
        Arc::new(move |p| {
            Box::new(Count {
                state: KeyGroups::default(),
                partition: p as usize,
                probe: count_probe.clone(),
                seen: false,
            })
        }),
    )
    .sink(
        "tally",
        partitions,
        Arc::new(move |_| Box::new(Tally(sink_probe.clone()))),
    );
    job
}

fn engine(cores: usize) -> Result<Dataflow, BenchError> {
    let mut config = DataflowConfig::default();
    config.runtime.shards = cores;
    Dataflow::start(config).map_err(|e| BenchError(format!("cannot start {cores} shards: {e}")))
}

// ---- the phases ----------------------------------------------------------------

/// Poll `done` every millisecond until it holds, the job fails, or `limit` passes.
fn wait_for(
    handle: &JobHandle,
    limit: Duration,
    what: &str,
    done: impl Fn() -> bool,
) -> Result<(), BenchError> {
    let start = Instant::now();
    loop {
        if done() {
            return Ok(());
        }
        if let Some(error) = handle.metrics().error() {
            return Err(BenchError(format!(
                "job failed waiting for {what}: {error}"
            )));
        }
        if handle.is_done() {
            let why = match handle.wait(Duration::ZERO) {
                Err(error) => error,
                Ok(_) => "its input ended".to_string(),
            };
            return Err(BenchError(format!("the job ended before {what}: {why}")));
        }
        if start.elapsed() > limit {
            return Err(BenchError(format!("waited {limit:?} for {what}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checkpoints that completed within a window: the job's figures at its end
/// less those at its start.
struct Window {
    completed: u64,
    written: u64,
    checkpoint_ms: Histogram<u64>,
    alignment_us: Histogram<u64>,
    /// Seconds the shards spent encoding groups (`CountGroup::encode`), the
    /// CPU seconds of the checkpointer thread, and of the whole process.
    encode_s: f64,
    checkpointer_cpu_s: f64,
    own_cpu_s: f64,
    /// Per checkpoint: first source barrier to last, in ns.
    injection_skews_ns: Vec<u64>,
}

impl Window {
    fn between(start: &CheckpointStats, end: &CheckpointStats) -> Result<Window, BenchError> {
        let less = |a: &Histogram<u64>, b: &Histogram<u64>| {
            let mut h = a.clone();
            h.subtract(b)
                .map_err(|e| BenchError(format!("a histogram went backwards: {e:?}")))?;
            Ok::<_, BenchError>(h)
        };
        Ok(Window {
            completed: end.completed - start.completed,
            written: end.written_bytes - start.written_bytes,
            checkpoint_ms: less(&end.checkpoint_ms, &start.checkpoint_ms)?,
            alignment_us: less(&end.alignment_us, &start.alignment_us)?,
            encode_s: 0.0,
            checkpointer_cpu_s: 0.0,
            own_cpu_s: 0.0,
            injection_skews_ns: Vec::new(),
        })
    }

    fn add(&mut self, other: &Window) {
        self.completed += other.completed;
        self.written += other.written;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.checkpoint_ms.add(&other.checkpoint_ms);
        let _ = self.alignment_us.add(&other.alignment_us);
        self.encode_s += other.encode_s;
        self.checkpointer_cpu_s += other.checkpointer_cpu_s;
        self.own_cpu_s += other.own_cpu_s;
        self.injection_skews_ns
            .extend_from_slice(&other.injection_skews_ns);
    }
}

/// One throughput run.
struct Sample {
    events_per_s: f64,
    load_s: f64,
    /// Turns of the shards over 10 ms in the window (`RuntimeStats::stalls`).
    stalls: u64,
    /// Share of the machine's CPU other processes used in the window.
    others_cpu: f64,
    /// Events per CPU second this process used in the window.
    events_per_cpu_s: f64,
    /// Checkpointed runs: the window's checkpoints and the job's at its stop.
    checkpoints: Option<(Window, CheckpointStats)>,
    /// The furthest any source partition got.
    max_position: u64,
}

fn measure(
    config: &Config,
    workload: &Arc<Workload>,
    data_dir: Option<&Path>,
) -> Result<Sample, BenchError> {
    let probe = Arc::new(Probe::new(config.cores, None));
    let options = data_dir.map(|dir| CheckpointOptions::new(dir, config.interval));
    let job = job(workload, &probe, config.cores as u32, u64::MAX, options);
    let mut dataflow = engine(config.cores)?;
    let outcome = dataflow.submit(job).map_err(BenchError).and_then(|handle| {
        let sample = measure_job(config, &dataflow, &probe, &handle)?;
        Ok((sample, handle))
    });
    dataflow.shutdown();
    let (mut sample, handle) = outcome?;
    if let Some((_, stats)) = &mut sample.checkpoints {
        // As of the stop: a commit in flight may have landed since.
        *stats = handle.checkpoint_stats().unwrap_or_else(|| stats.clone());
    }
    sample.max_position = probe.positions().max().unwrap_or(0);
    Ok(sample)
}

fn measure_job(
    config: &Config,
    dataflow: &Dataflow,
    probe: &Probe,
    handle: &JobHandle,
) -> Result<Sample, BenchError> {
    let submitted = Instant::now();
    let keys = config.keys;
    wait_for(handle, config.time_max, "the load phase", || {
        probe.positions().all(|p| p >= keys)
    })?;
    let load_s = submitted.elapsed().as_secs_f64();
    let stats = || handle.checkpoint_stats();
    if let Some(at_load) = stats() {
        // The checkpoint in flight now may hold load-phase groups; the one
        // after it was requested after the load phase.
        let wanted = at_load.completed + 2;
        wait_for(
            handle,
            config.time_max,
            "two checkpoints after the load phase",
            || stats().is_some_and(|s| s.completed >= wanted),
        )?;
    }
    let start_stats = stats();
    let stalls_start = dataflow.stats().stalls();
    let (cpu_start, checkpointer_start) = (Cpu::read(), Cpu::checkpointer_ticks());
    let encode_start = ENCODE_NS.load(Ordering::Relaxed);
    let (start, start_ns, handled_start) = (Instant::now(), probe.now_ns(), probe.handled());
    std::thread::sleep(Duration::from_secs_f64(config.seconds));
    let (elapsed, end_ns, handled_end) = (
        start.elapsed().as_secs_f64(),
        probe.now_ns(),
        probe.handled(),
    );
    let encode_s = ENCODE_NS
        .load(Ordering::Relaxed)
        .saturating_sub(encode_start) as f64
        / 1e9;
    let (cpu_end, checkpointer_end) = (Cpu::read(), Cpu::checkpointer_ticks());
    let end_stats = stats();
    let stalls = dataflow.stats().stalls().saturating_sub(stalls_start);
    if let Some(error) = handle.metrics().error() {
        return Err(BenchError(format!("job failed: {error}")));
    }
    let checkpoints = match (start_stats, end_stats) {
        (Some(start), Some(end)) => {
            let mut window = Window::between(&start, &end)?;
            window.encode_s = encode_s;
            window.checkpointer_cpu_s = match (checkpointer_start, checkpointer_end) {
                (Some(start), Some(end)) => end.saturating_sub(start) as f64 / 100.0,
                _ => f64::NAN,
            };
            window.own_cpu_s = match (cpu_start, cpu_end) {
                (Some(start), Some(end)) => start.own_s(&end),
                _ => f64::NAN,
            };
            window.injection_skews_ns = probe.injection_skews(start_ns, end_ns);
            Some((window, end))
        }
        _ => None,
    };
    if let Some((_, stats)) = &checkpoints {
        if stats.completed < 2 {
            return Err(BenchError(format!(
                "only {} checkpoints committed in the run",
                stats.completed
            )));
        }
    }
    Ok(Sample {
        events_per_s: (handled_end - handled_start) as f64 / elapsed,
        load_s,
        stalls,
        others_cpu: match (cpu_start, cpu_end) {
            (Some(start), Some(end)) => start.others_share(&end),
            _ => f64::NAN,
        },
        events_per_cpu_s: match (cpu_start, cpu_end) {
            (Some(start), Some(end)) if start.own_s(&end) > 0.0 => {
                (handled_end - handled_start) as f64 / start.own_s(&end)
            }
            _ => f64::NAN,
        },
        checkpoints,
        max_position: 0,
    })
}

struct Recovery {
    ms: f64,
    first_ms: f64,
    start_ms: f64,
    submit_ms: f64,
    restored_epoch: u64,
    handled: u64,
    lost: u64,
    duplicated: u64,
}

/// Resume the job of `data_dir` on a fresh engine, to event `end`, and check
/// every key's count.
fn recover(
    config: &Config,
    workload: &Arc<Workload>,
    data_dir: &Path,
    end: u64,
) -> Result<Recovery, BenchError> {
    let counts = vec![0u64; config.keys as usize];
    let probe = Arc::new(Probe::new(config.cores, Some(counts)));
    let options = CheckpointOptions::new(data_dir, config.interval);
    let job = job(workload, &probe, config.cores as u32, end, Some(options));
    let ms = |ns: u64| ns as f64 / 1e6;
    let origin = probe.origin;
    let mut dataflow = engine(config.cores)?;
    let start_ms = ms(origin.elapsed().as_nanos() as u64);
    let outcome = dataflow.submit(job).map_err(BenchError).and_then(|handle| {
        let submit_ms = ms(origin.elapsed().as_nanos() as u64);
        wait_for(
            &handle,
            config.time_max,
            "every count partition's first record",
            || probe.first_records().is_some(),
        )?;
        let firsts = probe.first_records();
        handle.wait(config.time_max).map_err(BenchError)?;
        Ok((handle, submit_ms, firsts))
    });
    dataflow.shutdown();
    let (handle, submit_ms, firsts) = outcome?;
    let Some((first_ns, last_ns)) = firsts else {
        return Err(BenchError(
            "a count partition handled no record in the resumed run".to_string(),
        ));
    };
    let stats = handle
        .checkpoint_stats()
        .expect("the resumed job takes checkpoints");
    let Some(restored_epoch) = stats.restored_epoch else {
        return Err(BenchError(format!(
            "the resumed job restored no checkpoint from {}",
            data_dir.display()
        )));
    };
    progress(
        config.progress,
        format_args!(
            "recovery: checkpoint {restored_epoch} restored, every count partition running \
             after {:.1} ms; checking {} keys against events 0..{end}",
            ms(last_ns),
            config.keys
        ),
    );
    let mut expected = vec![0u64; config.keys as usize];
    for n in 0..end {
        expected[workload.key(n) as usize] += 1;
    }
    let counts = probe
        .counts
        .as_ref()
        .expect("made with counts")
        .lock()
        .expect("counts poisoned");
    let (mut lost, mut duplicated) = (0u64, probe.stray.load(Ordering::Relaxed));
    for (&want, &got) in expected.iter().zip(counts.iter()) {
        lost += want.saturating_sub(got);
        duplicated += got.saturating_sub(want);
    }
    Ok(Recovery {
        ms: ms(last_ns),
        first_ms: ms(first_ns),
        start_ms,
        submit_ms,
        restored_epoch,
        handled: probe.handled(),
        lost,
        duplicated,
    })
}

/// CPU time, in clock ticks: the whole machine's busy and total (`/proc/stat`)
/// and this process's (`/proc/self/stat`, every thread).
#[derive(Clone, Copy)]
struct Cpu {
    busy: u64,
    total: u64,
    own: u64,
}

impl Cpu {
    fn read() -> Option<Cpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal (guest is in user).
        let field = |i: usize| ticks.get(i).copied().unwrap_or(0);
        let idle = field(3) + field(4);
        let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
        let own = ticks_of(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        Some(Cpu {
            busy,
            total: busy + idle,
            own,
        })
    }

    /// Clock ticks the job's checkpointer thread has used (its name starts
    /// with `checkpoint-`; one job runs at a time).
    fn checkpointer_ticks() -> Option<u64> {
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with("checkpoint-") {
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                return ticks_of(&stat);
            }
        }
        None
    }

    /// CPU seconds this process used from `self` to `end` (clock ticks are
    /// `USER_HZ`, 100 per second in Linux's user ABI).
    fn own_s(&self, end: &Cpu) -> f64 {
        end.own.saturating_sub(self.own) as f64 / 100.0
    }

    /// Share of the machine's CPU time from `self` to `end` that other
    /// processes used (steal included).
    fn others_share(&self, end: &Cpu) -> f64 {
        let total = end.total.saturating_sub(self.total);
        let others = end
            .busy
            .saturating_sub(self.busy)
            .saturating_sub(end.own.saturating_sub(self.own));
        if total == 0 {
            0.0
        } else {
            others as f64 / total as f64
        }
    }
}

/// utime + stime of a `/proc/.../stat` line: fields 14 and 15, 12 and 13 after
/// the `)` that closes the name.
fn ticks_of(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, BenchError> {
        let dir =
            std::env::temp_dir().join(format!("dirigo-bench-checkpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| BenchError(format!("{}: {e}", dir.display())))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    if config.cores == 0 || config.seconds <= 0.0 {
        return Err(BenchError("cores and seconds must be above 0".to_string()));
    }
    let workload = Arc::new(Workload::new(config.keys));
    if workload.hot.is_empty() {
        return Err(BenchError(format!(
            "{} keys leave the hot key groups empty",
            config.keys
        )));
    }
    let machine = Machine::detect();
    let temp = TempDir::new()?;
    progress(
        config.progress,
        format_args!(
            "checkpoint: {} keys ({} hot), {} cores, {:.1} s windows, data in {}",
            config.keys,
            workload.hot.len(),
            config.cores,
            config.seconds,
            temp.0.display()
        ),
    );
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut last_dir = None;
    for pair in 1..=PAIRS {
        let sample = measure(config, &workload, None)?;
        progress(
            config.progress,
            format_args!(
                "B{pair} (no checkpoints): load {:.2} s, {:.0} events/s, {:.0} per CPU second \
                 (other processes used {:.0}% of the CPU; {} turns over 10 ms)",
                sample.load_s,
                sample.events_per_s,
                sample.events_per_cpu_s,
                100.0 * sample.others_cpu,
                sample.stalls
            ),
        );
        without.push(sample);
        let dir = temp.0.join(format!("run-{pair}"));
        let sample = measure(config, &workload, Some(&dir))?;
        let (window, stats) = sample.checkpoints.as_ref().expect("a checkpointed run");
        progress(
            config.progress,
            format_args!(
                "C{pair} (every {:?}): load {:.2} s, {:.0} events/s, {:.0} per CPU second \
                 (other processes used {:.0}% of the CPU; {} turns over 10 ms); {} checkpoints \
                 in the window, p50 {} ms, p99 {} ms; {} committed, {} failed in all",
                config.interval,
                sample.load_s,
                sample.events_per_s,
                sample.events_per_cpu_s,
                100.0 * sample.others_cpu,
                sample.stalls,
                window.completed,
                window.checkpoint_ms.value_at_quantile(0.5),
                window.checkpoint_ms.value_at_quantile(0.99),
                stats.completed,
                stats.failed
            ),
        );
        with.push(sample);
        last_dir = Some(dir);
    }
    let data_dir = last_dir.expect("at least one pair");
    let last = with.last().expect("at least one checkpointed run");
    let (_, last_stats) = last.checkpoints.as_ref().expect("a checkpointed run");
    let disk = disk_bytes(&data_dir);
    let rate_with = median(&with.iter().map(|s| s.events_per_s).collect::<Vec<_>>());
    // About a second of input past where the stopped run's sources stood.
    let end = last.max_position + (rate_with as u64).max(config.cores as u64);
    let recovery = recover(config, &workload, &data_dir, end)?;
    progress(
        config.progress,
        format_args!(
            "recovery: {:.1} ms; lost {}, duplicated {}",
            recovery.ms, recovery.lost, recovery.duplicated
        ),
    );

    let mut windows: Option<Window> = None;
    for sample in &with {
        let (window, _) = sample.checkpoints.as_ref().expect("a checkpointed run");
        match &mut windows {
            None => {
                windows = Some(Window {
                    checkpoint_ms: window.checkpoint_ms.clone(),
                    alignment_us: window.alignment_us.clone(),
                    injection_skews_ns: window.injection_skews_ns.clone(),
                    ..*window
                })
            }
            Some(all) => all.add(window),
        }
    }
    let windows = windows.expect("at least one checkpointed run");
    let rates = |samples: &[Sample]| samples.iter().map(|s| s.events_per_s).collect::<Vec<_>>();
    let loads = |samples: &[Sample]| median(&samples.iter().map(|s| s.load_s).collect::<Vec<_>>());
    let all_stats = || {
        with.iter()
            .map(|s| &s.checkpoints.as_ref().expect("checkpointed").1)
    };
    let events_per_s_without = median(&rates(&without));
    let per_cpu = |samples: &[Sample]| {
        median(
            &samples
                .iter()
                .map(|s| s.events_per_cpu_s)
                .collect::<Vec<_>>(),
        )
    };
    let (per_cpu_without, per_cpu_with) = (per_cpu(&without), per_cpu(&with));
    Ok(Report {
        machine: machine.machine,
        cores: config.cores,
        keys: config.keys,
        seconds: config.seconds,
        throughput_ratio: rate_with / events_per_s_without,
        events_per_s_without,
        events_per_s_with: rate_with,
        events_per_s_without_samples: rates(&without),
        events_per_s_with_samples: rates(&with),
        events_per_cpu_s_without: per_cpu_without,
        events_per_cpu_s_with: per_cpu_with,
        cpu_efficiency_ratio: per_cpu_with / per_cpu_without,
        stalls_without_samples: without.iter().map(|s| s.stalls).collect(),
        stalls_with_samples: with.iter().map(|s| s.stalls).collect(),
        others_cpu_without_samples: without.iter().map(|s| round3(s.others_cpu)).collect(),
        others_cpu_with_samples: with.iter().map(|s| round3(s.others_cpu)).collect(),
        checkpoint_ms_p50: windows.checkpoint_ms.value_at_quantile(0.5),
        checkpoint_ms_p99: windows.checkpoint_ms.value_at_quantile(0.99),
        checkpoint_ms_max_all: all_stats()
            .map(|s| s.checkpoint_ms.max())
            .max()
            .unwrap_or(0),
        alignment_ms_p99: windows.alignment_us.value_at_quantile(0.99) as f64 / 1000.0,
        window_checkpoints: windows.completed,
        alignment_ms_p50: windows.alignment_us.value_at_quantile(0.5) as f64 / 1000.0,
        barrier_skew_ms_p50: round3(quantile_ms(&windows.injection_skews_ns, 0.5)),
        barrier_skew_ms_max: round3(quantile_ms(&windows.injection_skews_ns, 1.0)),
        encode_ms_per_checkpoint: round3(1e3 * windows.encode_s / windows.completed.max(1) as f64),
        checkpointer_cpu_ms_per_checkpoint: round3(
            1e3 * windows.checkpointer_cpu_s / windows.completed.max(1) as f64,
        ),
        checkpoint_cpu_share: round3(
            (windows.encode_s + windows.checkpointer_cpu_s) / windows.own_cpu_s,
        ),
        state_bytes: last_stats.state_bytes,
        checkpoint_bytes: last_stats.state_bytes,
        incremental_bytes: last_stats.incremental_bytes,
        incremental_bytes_mean: windows.written.checked_div(windows.completed).unwrap_or(0),
        incremental_bytes_mean_all: all_stats()
            .map(|s| s.written_bytes)
            .sum::<u64>()
            .checked_div(all_stats().map(|s| s.completed).sum())
            .unwrap_or(0),
        disk_bytes: disk,
        checkpoints_completed: all_stats().map(|s| s.completed).sum(),
        checkpoints_failed: all_stats().map(|s| s.failed).sum(),
        last_checkpoint_error: all_stats().filter_map(|s| s.last_error.clone()).next_back(),
        load_s_without: round3(loads(&without)),
        load_s_with: round3(loads(&with)),
        recovery_ms: round3(recovery.ms),
        recovery_first_ms: round3(recovery.first_ms),
        recovery_start_ms: round3(recovery.start_ms),
        recovery_submit_ms: round3(recovery.submit_ms),
        restored_epoch: recovery.restored_epoch,
        recovery_end_event: end,
        recovery_events_handled: recovery.handled,
        lost: recovery.lost,
        duplicated: recovery.duplicated,
        note: NOTE,
    })
}

// ---- the table ---------------------------------------------------------------

/// The `q` quantile of `ns` (nearest rank), in ms; 0 for none.
fn quantile_ms(ns: &[u64], q: f64) -> f64 {
    let mut sorted = ns.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => 0.0,
        n => sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1] as f64 / 1e6,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |samples: &[f64]| {
            samples
                .iter()
                .map(|x| format!("{:.0}%", 100.0 * x))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rates = |samples: &[f64]| {
            samples
                .iter()
                .map(|x| format!("{:.2}M", x / 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "dirigo bench checkpoint: keyed count over {} keys, {:.1} s windows, runs B, C \
             alternated {PAIRS} times (medians)",
            self.keys, self.seconds
        )?;
        writeln!(f, "machine: {} ({} cores used)", self.machine, self.cores)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<26}{:<20}target (information only) / detail",
            "figure", "measured"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, value: String, detail: String| {
            writeln!(f, "{name:<26}{value:<20}{detail}")
        };
        row(
            f,
            "events/s without",
            format!("{:.2}M", self.events_per_s_without / 1e6),
            format!(
                "samples {}; other processes took {} of the CPU; shard turns over 10 ms: {:?}",
                rates(&self.events_per_s_without_samples),
                pct(&self.others_cpu_without_samples),
                self.stalls_without_samples
            ),
        )?;
        row(
            f,
            "events/s with",
            format!("{:.2}M", self.events_per_s_with / 1e6),
            format!(
                "samples {}; other processes took {} of the CPU; shard turns over 10 ms: {:?}",
                rates(&self.events_per_s_with_samples),
                pct(&self.others_cpu_with_samples),
                self.stalls_with_samples
            ),
        )?;
        row(
            f,
            "throughput_ratio",
            format!("{:.3}", self.throughput_ratio),
            format!(">= 0.9 ({})", verdict(self.throughput_ratio >= 0.9)),
        )?;
        row(
            f,
            "events per CPU second",
            format!(
                "{:.2}M / {:.2}M",
                self.events_per_cpu_s_without / 1e6,
                self.events_per_cpu_s_with / 1e6
            ),
            format!(
                "without / with, ratio {:.3} (this process's CPU, checkpointer included)",
                self.cpu_efficiency_ratio
            ),
        )?;
        row(
            f,
            "checkpoint ms p50 / p99",
            format!("{} / {}", self.checkpoint_ms_p50, self.checkpoint_ms_p99),
            format!(
                "{} checkpoints in the windows; max {} ms over whole runs (load phase included)",
                self.window_checkpoints, self.checkpoint_ms_max_all
            ),
        )?;
        row(
            f,
            "alignment_ms_p99",
            format!("{:.3}", self.alignment_ms_p99),
            format!(
                "<= 10 ({}); p50 {:.3}; sources' barriers apart: p50 {:.3}, max {:.3}",
                verdict(self.alignment_ms_p99 <= 10.0),
                self.alignment_ms_p50,
                self.barrier_skew_ms_p50,
                self.barrier_skew_ms_max
            ),
        )?;
        row(
            f,
            "checkpoint CPU",
            format!("{:.1}%", 100.0 * self.checkpoint_cpu_share),
            format!(
                "of this process's CPU in the windows; per checkpoint: encoding on the shards \
                 {:.1} ms, checkpointer thread {:.1} ms",
                self.encode_ms_per_checkpoint, self.checkpointer_cpu_ms_per_checkpoint
            ),
        )?;
        row(
            f,
            "state_bytes",
            format!("{:.1} MB", mb(self.state_bytes)),
            "encoded state of the newest manifest = a full checkpoint (checkpoint_bytes)"
                .to_string(),
        )?;
        row(
            f,
            "incremental_bytes",
            format!("{:.1} MB", mb(self.incremental_bytes)),
            format!(
                "newest checkpoint, {:.1}% of the state; mean {:.1} MB in the windows, \
                 {:.1} MB over whole runs",
                100.0 * self.incremental_bytes as f64 / self.state_bytes.max(1) as f64,
                mb(self.incremental_bytes_mean),
                mb(self.incremental_bytes_mean_all)
            ),
        )?;
        row(
            f,
            "data directory",
            format!("{:.1} MB", mb(self.disk_bytes)),
            "on disk after the stop (two manifests kept)".to_string(),
        )?;
        row(
            f,
            "checkpoints",
            format!(
                "{} / {}",
                self.checkpoints_completed, self.checkpoints_failed
            ),
            format!(
                "completed / failed, both checkpointed runs{}",
                self.last_checkpoint_error
                    .as_ref()
                    .map_or(String::new(), |e| format!("; last error: {e}"))
            ),
        )?;
        row(
            f,
            "recovery_ms",
            format!("{:.1}", self.recovery_ms),
            format!(
                "<= 1000 for >= 100 MB ({}{})",
                verdict(self.recovery_ms <= 1000.0),
                if self.state_bytes >= 100_000_000 {
                    ""
                } else {
                    "; this state is under 100 MB"
                }
            ),
        )?;
        row(
            f,
            "  of which",
            String::new(),
            format!(
                "engine started {:.1} ms, job submitted (checkpoint {} read) {:.1} ms, first \
                 partition running {:.1} ms",
                self.recovery_start_ms,
                self.restored_epoch,
                self.recovery_submit_ms,
                self.recovery_first_ms
            ),
        )?;
        row(
            f,
            "lost / duplicated",
            format!("{} / {}", self.lost, self.duplicated),
            format!(
                "0 / 0 ({}); every key's count of events 0..{} checked, {} events handled \
                 after the restore",
                verdict(self.lost == 0 && self.duplicated == 0),
                self.recovery_end_event,
                self.recovery_events_handled
            ),
        )?;
        row(
            f,
            "load phase s",
            format!("{:.2} / {:.2}", self.load_s_without, self.load_s_with),
            "without / with: submission to every key generated".to_string(),
        )?;
        write!(f, "note: {}", self.note)
    }
}

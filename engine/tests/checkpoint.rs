//! Checkpoints of a real (threaded) engine, checked exactly against a plain
//! reference: a job stopped after some checkpoints and resumed from its data
//! directory writes exactly the rows of an uninterrupted run (as a multiset),
//! over several stop points and shard counts, also while its actors migrate
//! and its key groups reroute;
//! a corrupt or truncated manifest, snapshot chunk or staged output file is
//! detected and the one checkpoint before is used; a full disk fails
//! checkpoints and the job runs on. The count stage fires each window over
//! many turns (a few keys a step), so all of this meets fires under way.
//! (Kill -9 of the real binary is `tests/recovery.rs` at the top of the
//! repository.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirigo_engine::dataflow::checkpoint::{
    self, CheckpointOptions, CheckpointStats, Faults, Sealed, StagedOutput,
};
use dirigo_engine::dataflow::ops::{Aggregate, Count, Window, WindowAggregate, WindowSpec};
use dirigo_engine::dataflow::reroute::random_change;
use dirigo_engine::dataflow::{
    Dataflow, DataflowConfig, Job, Sink, Source, SourceBatch, KEY_GROUPS_DEFAULT,
};
use dirigo_engine::runtime::sim::SimRng;
use dirigo_engine::ShardId;

const EVENTS: u64 = 120_000;
const WINDOW_MS: i64 = 50;
const KEYS: u64 = 500;
/// Keys a window fire of the count stage visits per turn.
const FIRE_STEP_KEYS: usize = 13;
/// Records per second of a run: its 120,000 records take 1.2 s, long enough
/// for a few checkpoints even when the test threads share two cores.
const FAST: u64 = 100_000;

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Reading {
    n: u64,
    key: u64,
    time_ms: i64,
}

fn reading(n: u64) -> Reading {
    let mix = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    Reading {
        n,
        key: mix % KEYS,
        time_ms: (n / 20) as i64,
    }
}

/// Readings `part, part + parts, ...`; its position is the next number.
struct Readings {
    next: u64,
    step: u64,
}

impl Source<Reading> for Readings {
    fn next_batch(&mut self, max: usize, out: &mut Vec<Reading>) -> SourceBatch {
        for _ in 0..max {
            if self.next >= EVENTS {
                return SourceBatch::Done;
            }
            out.push(reading(self.next));
            self.next += self.step;
        }
        SourceBatch::More {
            watermark_ms: reading(self.next - self.step).time_ms,
        }
    }
    fn position(&self) -> Option<Vec<u8>> {
        Some(self.next.to_le_bytes().to_vec())
    }
    fn seek(&mut self, position: &[u8]) -> Result<(), String> {
        let bytes: [u8; 8] = position.try_into().map_err(|_| "not 8 bytes")?;
        self.next = u64::from_le_bytes(bytes);
        Ok(())
    }
}

/// Rows as lines, staged in the data directory (exactly once).
struct Lines(StagedOutput);

impl Sink<(u64, i64, u64)> for Lines {
    fn write(&mut self, records: &[(u64, i64, u64)]) {
        let mut text = String::new();
        for (key, start, n) in records {
            text.push_str(&format!("{key},{start},{n}\n"));
        }
        self.0.write(text.as_bytes());
    }
    fn seal(&mut self, _epoch: u64) -> Result<Vec<Sealed>, String> {
        Ok(self.0.seal())
    }
}

/// An aggregate that spends `ns` of CPU on each record before `A`'s `add`,
/// and counts records that came out of their channel's order: each source
/// partition `p` of 2 sends readings `p, p + 2, ...`, so per key and source
/// partition the numbers must rise.
struct Slow<A> {
    inner: A,
    ns: u64,
    last: Mutex<HashMap<(u64, u64), u64>>,
    disorder: Arc<AtomicU64>,
}

impl<A: Aggregate<Reading>> Aggregate<Reading> for Slow<A> {
    type Acc = A::Acc;
    type Out = A::Out;
    const MERGEABLE: bool = A::MERGEABLE;

    fn new_acc(&self) -> A::Acc {
        self.inner.new_acc()
    }
    fn add(&self, acc: &mut A::Acc, record: &Reading) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_nanos(self.ns) {
            std::hint::spin_loop();
        }
        let mut last = self.last.lock().unwrap();
        if let Some(previous) = last.insert((record.key, record.n % 2), record.n) {
            if previous >= record.n {
                self.disorder.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.inner.add(acc, record);
    }
    fn merge(&self, acc: &mut A::Acc, other: A::Acc) {
        self.inner.merge(acc, other);
    }
    fn emit(&self, key: u64, window: Window, acc: A::Acc, out: &mut Vec<A::Out>) {
        self.inner.emit(key, window, acc, out);
    }
}

fn job(dir: &Path, output: &Path, faults: Faults, rate: u64) -> Job {
    job_with(dir, output, faults, Some(rate), 0, Arc::default())
}

/// The job, paced at `rate` (unpaced: `None`), its count stage spending
/// `work_ns` on each record and counting records out of order in `disorder`.
fn job_with(
    dir: &Path,
    output: &Path,
    faults: Faults,
    rate: Option<u64>,
    work_ns: u64,
    disorder: Arc<AtomicU64>,
) -> Job {
    let mut job = Job::new("counts", Duration::from_millis(50));
    // With no autoscaler, relays only if asked for.
    job.rate(rate).source_batch_records(256).relays(true);
    let mut options = CheckpointOptions::new(dir, Duration::from_millis(25));
    options.faults = faults.clone();
    job.checkpoints(options);
    let (dir, output, staged_faults) = (dir.to_path_buf(), output.to_path_buf(), faults);
    job.source(
        "readings",
        2,
        Arc::new(|p, n| {
            Box::new(Readings {
                next: p as u64,
                step: n as u64,
            })
        }),
    )
    // A step (it drops nothing): on more shards than the source's two
    // partitions, it may be split out onto a relay (`Moves::MigrateAndUnchain`).
    .filter(|r: &Reading| r.time_ms >= 0)
    .key_by(|r: &Reading| r.key)
    .process(
        "count",
        3,
        // A window (some 170 keys a partition) fires over a dozen steps, so
        // barriers, migrations and restores meet fires under way.
        WindowAggregate::new(
            WindowSpec::Tumbling { size_ms: WINDOW_MS },
            |r: &Reading| r.time_ms,
            |r: &Reading| r.key,
            Slow {
                inner: Count::new(|key, (start, _), n| (key, start, n)),
                ns: work_ns,
                last: Mutex::default(),
                disorder,
            },
        )
        .fire_step_keys(FIRE_STEP_KEYS)
        .factory(),
    )
    .sink(
        "out",
        2,
        Arc::new(move |p| {
            let staged = StagedOutput::new(&dir, output.clone(), &format!("out-{p}"))
                .unwrap()
                .with_faults(staged_faults.clone());
            Box::new(Lines(staged))
        }),
    );
    job
}

/// Every `(key, window, count)` line of an uninterrupted run, sorted.
fn reference() -> Vec<String> {
    let mut counts = BTreeMap::new();
    for n in 0..EVENTS {
        let r = reading(n);
        *counts
            .entry((r.key, r.time_ms - r.time_ms.rem_euclid(WINDOW_MS)))
            .or_insert(0u64) += 1;
    }
    let mut lines: Vec<String> = counts
        .into_iter()
        .map(|((key, start), n)| format!("{key},{start},{n}"))
        .collect();
    lines.sort();
    lines
}

fn lines_of(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// `part` is a sub-multiset of `whole` (both sorted).
fn is_part_of(part: &[String], whole: &[String]) -> bool {
    let mut whole = whole.iter().peekable();
    part.iter().all(|line| {
        while let Some(w) = whole.peek() {
            if *w < line {
                whole.next();
            } else {
                break;
            }
        }
        whole.next() == Some(line)
    })
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dirigo-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

enum Until {
    /// Stop the engine once this many checkpoints committed in this run.
    Checkpoints(u64),
    End,
}

/// What moves while a run goes on.
#[derive(Clone)]
enum Moves {
    None,
    /// A thread moves the job's actors between shards all along.
    Migrate,
    /// And reroutes the count stage's key groups at random (ranges split,
    /// merged, scattered): counts the reroutes carried out and those refused
    /// because a checkpoint was under way.
    MigrateAndReroute(Arc<Reroutes>),
    /// And switches the source's step between fused and its relay at
    /// random: counts the switches.
    MigrateAndUnchain(Arc<AtomicU64>),
    /// All of the above.
    Everything(Arc<Reroutes>, Arc<AtomicU64>),
}

#[derive(Default)]
struct Reroutes {
    done: AtomicU64,
    refused: AtomicU64,
}

/// Run the job (paced at `rate` records/s) on `shards` until `until`, with
/// `moves` going on. Returns the run's checkpoint stats.
fn run(
    rate: u64,
    shards: usize,
    data: &Path,
    output: &Path,
    until: Until,
    moves: Moves,
    faults: Faults,
) -> Result<CheckpointStats, String> {
    // Slower with migrations, so that checkpoints commit before the end.
    let rate = match moves {
        Moves::None => rate,
        _ => rate.min(60_000),
    };
    let mut config = DataflowConfig::default();
    config.runtime.shards = shards;
    config.runtime.oversubscribe = true;
    let mut dataflow = Dataflow::start(config).unwrap();
    let handle = dataflow.submit(job(data, output, faults, rate))?;
    let dataflow = Arc::new(dataflow);
    let stop = Arc::new(AtomicBool::new(false));
    let mover = (!matches!(moves, Moves::None)).then(|| {
        let (dataflow, stop, job) = (dataflow.clone(), stop.clone(), handle.id);
        let actors = dataflow.actors(job);
        let keyed = dataflow.keyed_stages(job);
        std::thread::spawn(move || {
            let mut rng = SimRng::new(shards as u64);
            // Records flow by the tables a resumed job restored before the
            // first new reroute reaches its sources.
            std::thread::sleep(Duration::from_millis(20));
            while !stop.load(Ordering::Relaxed) {
                let actor = actors[rng.below(actors.len() as u64) as usize];
                dataflow.migrate(actor, ShardId(rng.below(shards as u64) as u16));
                let (reroutes, switches) = match &moves {
                    Moves::MigrateAndReroute(reroutes) => (Some(reroutes), None),
                    Moves::MigrateAndUnchain(switches) => (None, Some(switches)),
                    Moves::Everything(reroutes, switches) => (Some(reroutes), Some(switches)),
                    _ => (None, None),
                };
                if let Some(switches) = switches {
                    dataflow.unchain(job, 0, rng.below(2) == 0).unwrap();
                    switches.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(reroutes) = reroutes {
                    let stage = keyed[rng.below(keyed.len() as u64) as usize];
                    let change = match dataflow.routing(job, stage.stage) {
                        Some((owners, true)) => {
                            random_change(&mut rng, &owners, stage, KEY_GROUPS_DEFAULT)
                                .filter(|table| *table != owners)
                        }
                        _ => None,
                    };
                    if let Some(table) = change {
                        match dataflow.reroute(job, stage.stage, table) {
                            Ok(()) => reroutes.done.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                assert!(e.contains("checkpoint"), "{e}");
                                reroutes.refused.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    });
    let started = Instant::now();
    let outcome = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "run hangs");
        let stats = handle.checkpoint_stats().unwrap();
        if handle.is_done() {
            break match handle.wait(Duration::from_secs(1)) {
                Ok(_) => Ok(stats),
                Err(e) => Err(e),
            };
        }
        if let Until::Checkpoints(n) = until {
            if stats.completed >= n {
                break Ok(stats);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    stop.store(true, Ordering::Relaxed);
    if let Some(mover) = mover {
        mover.join().unwrap();
    }
    let dataflow = Arc::into_inner(dataflow).expect("the mover is gone");
    dataflow.shutdown();
    // The stats as of the stop (the last commit may have landed since).
    outcome.map(|stats| handle.checkpoint_stats().unwrap_or(stats))
}

#[test]
fn a_stopped_job_resumes_to_exactly_the_uninterrupted_output() {
    let expected = reference();
    for shards in [1usize, 2, 3] {
        for stop_after in [1u64, 3] {
            let dir = temp_dir(&format!("resume-{shards}-{stop_after}"));
            let (data, output) = (dir.join("data"), dir.join("out.txt"));
            let first = run(
                FAST,
                shards,
                &data,
                &output,
                Until::Checkpoints(stop_after),
                Moves::None,
                Faults::default(),
            )
            .unwrap();
            eprintln!(
                "plain shards {shards}: {} committed, p50 {} p99 {} ms, align p99 {} us",
                first.completed,
                first.checkpoint_ms.value_at_quantile(0.5),
                first.checkpoint_ms.value_at_quantile(0.99),
                first.alignment_us.value_at_quantile(0.99)
            );
            assert!(first.completed >= stop_after);
            // Only committed rows are in the output, all of them rows of the
            // uninterrupted run.
            let partial = lines_of(&output);
            assert!(
                partial.len() < expected.len(),
                "shards {shards}: the run was stopped before its end"
            );
            // The newest manifest says what its checkpoint makes the output:
            // all of it, appended.
            let committed = checkpoint::committed_output_lens(&data).unwrap();
            let len = std::fs::metadata(&output).unwrap().len();
            assert!(
                committed
                    .iter()
                    .any(|(path, l)| Path::new(path) == output && *l == len),
                "{committed:?} against {len} bytes"
            );
            assert!(is_part_of(&partial, &expected), "uncommitted or wrong rows");
            let second = run(
                FAST,
                shards,
                &data,
                &output,
                Until::End,
                Moves::None,
                Faults::default(),
            )
            .unwrap();
            assert_eq!(
                second.restored_epoch,
                Some(first.last_epoch).filter(|&e| e > 0)
            );
            assert_eq!(
                lines_of(&output),
                expected,
                "shards {shards} stop after {stop_after}"
            );
            // The run has finished: submitting it again says so.
            let again = run(
                FAST,
                shards,
                &data,
                &output,
                Until::End,
                Moves::None,
                Faults::default(),
            );
            let error = again.err().expect("a finished run does not start again");
            assert!(error.contains("already finished"), "{error}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn a_stage_behind_its_input_hands_back_what_it_held_in_steps_and_stays_exact() {
    // Unpaced, with a count stage slower than its sources: its mailbox stays
    // full, an alignment holds many batches, and handing them back takes
    // longer than one replay step (each batch is some 0.25 ms of work), so
    // it goes on over several `Replay`s while new batches queue behind.
    let expected = reference();
    for shards in [1usize, 2] {
        let dir = temp_dir(&format!("replay-{shards}"));
        let (data, output) = (dir.join("data"), dir.join("out.txt"));
        let mut config = DataflowConfig::default();
        config.runtime.shards = shards;
        config.runtime.oversubscribe = true;
        let mut dataflow = Dataflow::start(config).unwrap();
        let disorder = Arc::new(AtomicU64::new(0));
        let job = job_with(
            &data,
            &output,
            Faults::default(),
            None,
            1_000,
            disorder.clone(),
        );
        let handle = dataflow.submit(job).unwrap();
        let started = Instant::now();
        while !handle.is_done() {
            assert!(started.elapsed() < Duration::from_secs(60), "run hangs");
            std::thread::sleep(Duration::from_millis(1));
        }
        let stats = handle.checkpoint_stats().unwrap();
        handle.wait(Duration::from_secs(1)).unwrap();
        dataflow.shutdown();
        eprintln!(
            "shards {shards}: {} checkpoints, {} replay steps, align p99 {} us",
            stats.completed,
            stats.replay_steps,
            stats.alignment_us.value_at_quantile(0.99)
        );
        assert!(stats.completed >= 2, "checkpoints were taken");
        assert!(stats.replay_steps > 0, "some hand-back took several steps");
        assert_eq!(disorder.load(Ordering::Relaxed), 0, "channel order kept");
        let lines = lines_of(&output);
        assert!(
            lines == expected,
            "shards {shards}: {} rows, {} expected",
            lines.len(),
            expected.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn checkpoints_taken_while_actors_migrate_restore_exactly() {
    let expected = reference();
    for shards in [2usize, 3] {
        let dir = temp_dir(&format!("migrate-{shards}"));
        let (data, output) = (dir.join("data"), dir.join("out.txt"));
        let first = run(
            FAST,
            shards,
            &data,
            &output,
            Until::Checkpoints(4),
            Moves::Migrate,
            Faults::default(),
        )
        .unwrap();
        eprintln!(
            "shards {shards}: {} committed, {} failed, p99 {} ms, last error {:?}",
            first.completed,
            first.failed,
            first.checkpoint_ms.value_at_quantile(0.99),
            first.last_error
        );
        assert!(first.completed >= 4, "checkpoints commit while actors move");
        assert_eq!(first.failed, 0, "{:?}", first.last_error);
        run(
            FAST,
            shards,
            &data,
            &output,
            Until::End,
            Moves::Migrate,
            Faults::default(),
        )
        .unwrap();
        assert_eq!(lines_of(&output), expected, "shards {shards}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Run the job on `shards` in `dir` under `moves`: stopped after 3
/// checkpoints, twice (what is committed each time a part of the
/// reference), then resumed to the end. The checkpoints committed before
/// the last run, and the last run's stats.
fn stop_twice_then_finish(
    shards: usize,
    dir: &Path,
    moves: Moves,
    expected: &[String],
) -> (u64, CheckpointStats) {
    let (data, output) = (dir.join("data"), dir.join("out.txt"));
    let mut committed = 0;
    for stop_after in [3u64, 3] {
        let stats = run(
            FAST,
            shards,
            &data,
            &output,
            Until::Checkpoints(stop_after),
            moves.clone(),
            Faults::default(),
        )
        .unwrap();
        assert_eq!(stats.failed, 0, "{:?}", stats.last_error);
        committed += stats.completed;
        let partial = lines_of(&output);
        assert!(is_part_of(&partial, expected), "uncommitted or wrong rows");
    }
    let last = run(
        FAST,
        shards,
        &data,
        &output,
        Until::End,
        moves,
        Faults::default(),
    )
    .unwrap();
    (committed, last)
}

/// Key groups of the count stage change owner at random (ranges split and
/// merged, groups scattered) while its actors migrate and checkpoints are
/// taken; the job is stopped after some checkpoints and resumed (rerouting
/// on), twice: the output is exactly the uninterrupted run's. Reroutes and
/// checkpoints take turns: a reroute asked for while a checkpoint's
/// barriers are out is refused, and a checkpoint waits for a reroute.
#[test]
fn checkpoints_taken_while_key_groups_reroute_restore_exactly() {
    let expected = reference();
    for shards in [1usize, 2] {
        let dir = temp_dir(&format!("reroute-{shards}"));
        let output = dir.join("out.txt");
        let reroutes = Arc::new(Reroutes::default());
        let moves = Moves::MigrateAndReroute(reroutes.clone());
        let (committed, last) = stop_twice_then_finish(shards, &dir, moves, &expected);
        let (done, refused) = (
            reroutes.done.load(Ordering::Relaxed),
            reroutes.refused.load(Ordering::Relaxed),
        );
        eprintln!(
            "shards {shards}: {} checkpoints committed, {done} reroutes, {refused} refused \
             during a checkpoint",
            committed + last.completed
        );
        assert!(committed >= 6, "checkpoints commit between reroutes");
        assert!(done >= 20, "shards {shards}: only {done} reroutes");
        // Some 150 of about 2,300 were asked for while a checkpoint was
        // under way; none refused would mean the turns were never taken.
        assert!(refused >= 1, "shards {shards}: no reroute met a checkpoint");
        assert_eq!(lines_of(&output), expected, "shards {shards}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The source's step (2 partitions) is split out onto its relay (a
/// partition per shard) and fused back at random while actors migrate and
/// checkpoints are taken; the job is stopped after some checkpoints and
/// resumed, twice: the output is exactly the uninterrupted run's. Barriers
/// cross the direct path and the relays, which align them like any stage.
#[test]
fn checkpoints_taken_while_steps_switch_between_fused_and_relays_restore_exactly() {
    let expected = reference();
    for shards in [3usize, 4] {
        let dir = temp_dir(&format!("unchain-{shards}"));
        let output = dir.join("out.txt");
        let switches = Arc::new(AtomicU64::new(0));
        let moves = Moves::MigrateAndUnchain(switches.clone());
        let (committed, last) = stop_twice_then_finish(shards, &dir, moves, &expected);
        let switches = switches.load(Ordering::Relaxed);
        eprintln!(
            "shards {shards}: {} checkpoints committed, {switches} switches",
            committed + last.completed
        );
        assert!(committed >= 6, "checkpoints commit while steps switch");
        assert!(switches >= 100, "shards {shards}: only {switches} switches");
        assert_eq!(lines_of(&output), expected, "shards {shards}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A job whose count stage's key groups reroute at random, and whose
/// source's step is switched onto its relay and back, is stopped on 3
/// shards (a relay of 3 partitions), resumed on 2 (none: the relay parts of
/// the first run are carried on, their tables left behind by the reroutes
/// here), on 4 (a relay partition with no part at all) and then to the end
/// on 3 (the old parts again). A checkpoint's shape is the job's own
/// stages: the count's restored channels are fitted to the relays there
/// are now, and every relay routes by the checkpoint's tables at least. The
/// output is exactly the uninterrupted run's.
#[test]
fn a_job_resumed_on_other_shard_counts_meets_other_relays_and_stays_exact() {
    let expected = reference();
    let dir = temp_dir("relays-reshard");
    let (data, output) = (dir.join("data"), dir.join("out.txt"));
    let (reroutes, switches) = (Arc::new(Reroutes::default()), Arc::new(AtomicU64::new(0)));
    let everything = Moves::Everything(reroutes.clone(), switches.clone());
    let rerouting = Moves::MigrateAndReroute(reroutes.clone());
    for (shards, moves) in [(3usize, &everything), (2, &rerouting), (4, &everything)] {
        let stats = run(
            FAST,
            shards,
            &data,
            &output,
            Until::Checkpoints(3),
            moves.clone(),
            Faults::default(),
        )
        .unwrap();
        assert_eq!(stats.failed, 0, "{:?}", stats.last_error);
        assert!(is_part_of(&lines_of(&output), &expected), "shards {shards}");
    }
    run(
        FAST,
        3,
        &data,
        &output,
        Until::End,
        everything,
        Faults::default(),
    )
    .unwrap();
    let (done, switched) = (
        reroutes.done.load(Ordering::Relaxed),
        switches.load(Ordering::Relaxed),
    );
    eprintln!("{done} reroutes, {switched} switches");
    assert!(done >= 20, "only {done} reroutes");
    assert!(switched >= 50, "only {switched} switches");
    assert_eq!(lines_of(&output), expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What to damage, and how.
#[derive(Clone, Copy, Debug)]
enum Damage {
    Truncate,
    FlipBit,
}

fn damage(path: &Path, how: Damage) {
    let mut bytes = std::fs::read(path).unwrap();
    assert!(!bytes.is_empty(), "{} is empty", path.display());
    match how {
        Damage::Truncate => bytes.truncate(bytes.len() / 2),
        Damage::FlipBit => {
            let at = bytes.len() * 2 / 3;
            bytes[at] ^= 0x10;
        }
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupt_checkpoint_file_falls_back_to_the_checkpoint_before() {
    let expected = reference();
    for kind in ["manifest", "chunk", "staged"] {
        for how in [Damage::Truncate, Damage::FlipBit] {
            let dir = temp_dir(&format!("corrupt-{kind}-{how:?}"));
            let (data, output) = (dir.join("data"), dir.join("out.txt"));
            // Run until the newest checkpoint holds a file of this kind that
            // the one before does not refer to (a checkpoint taken while the
            // machine was too busy for the source to run may change nothing).
            let mut target = None;
            for _ in 0..5 {
                run(
                    60_000,
                    2,
                    &data,
                    &output,
                    Until::Checkpoints(3),
                    Moves::None,
                    Faults::default(),
                )
                .unwrap();
                let epochs = checkpoint::manifest_epochs(&data).unwrap();
                assert_eq!(epochs.len(), 2, "the last two checkpoints are kept");
                let (newest, before) = (epochs[1], epochs[0]);
                let (chunks, staged) = checkpoint::manifest_files(&data, newest).unwrap();
                let (older_chunks, older_staged) =
                    checkpoint::manifest_files(&data, before).unwrap();
                let file = match kind {
                    "manifest" => Some(
                        data.join("checkpoints")
                            .join(format!("MANIFEST-{newest:020}")),
                    ),
                    "chunk" => chunks
                        .iter()
                        .find(|c| !older_chunks.contains(c))
                        .map(|c| data.join("checkpoints").join(c)),
                    _ => staged
                        .iter()
                        .find(|f| !older_staged.contains(f))
                        .map(|f| data.join("staged").join(f)),
                };
                if let Some(file) = file {
                    target = Some((file, newest, before));
                    break;
                }
            }
            let (target, newest, before) =
                target.unwrap_or_else(|| panic!("{kind}: no checkpoint wrote one in 5 tries"));
            damage(&target, how);
            let resumed = run(
                FAST,
                2,
                &data,
                &output,
                Until::End,
                Moves::None,
                Faults::default(),
            )
            .unwrap_or_else(|e| panic!("{kind} {how:?}: {e}"));
            assert_eq!(
                resumed.restored_epoch,
                Some(before),
                "{kind} {how:?}: falls back to the checkpoint before"
            );
            assert!(
                resumed
                    .warnings
                    .iter()
                    .any(|w| w.contains(&newest.to_string())),
                "{kind} {how:?}: the fallback is reported: {:?}",
                resumed.warnings
            );
            assert_eq!(lines_of(&output), expected, "{kind} {how:?}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn with_every_checkpoint_unreadable_the_job_refuses_to_start() {
    let dir = temp_dir("all-corrupt");
    let (data, output) = (dir.join("data"), dir.join("out.txt"));
    run(
        FAST,
        2,
        &data,
        &output,
        Until::Checkpoints(3),
        Moves::None,
        Faults::default(),
    )
    .unwrap();
    for epoch in checkpoint::manifest_epochs(&data).unwrap() {
        let path = data
            .join("checkpoints")
            .join(format!("MANIFEST-{epoch:020}"));
        damage(&path, Damage::FlipBit);
    }
    let error = run(
        FAST,
        2,
        &data,
        &output,
        Until::End,
        Moves::None,
        Faults::default(),
    )
    .err()
    .expect("no readable checkpoint: no start");
    assert!(error.contains("no checkpoint"), "{error}");
    assert!(
        error.contains("--fresh"),
        "the error says what to do: {error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run the job to its end with `faults` armed: every armed fault is hit
/// (`pending` reads what is left), at least one checkpoint fails and is
/// reported, later ones commit, and the output is exact. The last error.
fn run_on_a_full_disk(name: &str, faults: Faults, pending: fn(&Faults) -> u64) -> String {
    let expected = reference();
    let dir = temp_dir(name);
    let (data, output) = (dir.join("data"), dir.join("out.txt"));
    let stats = run(
        FAST,
        2,
        &data,
        &output,
        Until::End,
        Moves::None,
        faults.clone(),
    )
    .unwrap();
    assert_eq!(pending(&faults), 0, "every armed fault was hit");
    assert!(stats.failed >= 1, "the failed checkpoints are reported");
    assert!(stats.completed >= 1, "later checkpoints succeed");
    assert_eq!(lines_of(&output), expected);
    let _ = std::fs::remove_dir_all(&dir);
    stats.last_error.unwrap_or_default()
}

#[test]
fn a_full_disk_fails_checkpoints_and_the_next_one_succeeds() {
    // The first three snapshot or manifest writes find the disk full.
    let error = run_on_a_full_disk("enospc", Faults::enospc(3), Faults::enospc_pending);
    assert!(
        error.contains("No space left") || error.contains("os error 28"),
        "{error}"
    );
}

#[test]
fn a_full_disk_under_staged_output_fails_a_checkpoint_and_loses_no_row() {
    // Staged rows find the disk full six times: the writes wait and try again.
    let faults = Faults::default();
    faults.arm_staged_enospc(6);
    let error = run_on_a_full_disk("staged-enospc", faults, Faults::staged_enospc_pending);
    assert!(
        error.contains("staging output") && error.contains("os error 28"),
        "{error}"
    );
}

#[test]
fn a_crash_just_before_the_final_checkpoint_duplicates_no_row() {
    let expected = reference();
    for round in 0..3 {
        let dir = temp_dir(&format!("before-final-{round}"));
        let (data, output) = (dir.join("data"), dir.join("out.txt"));
        // Slow chunk writes on the shards keep a checkpoint in flight while
        // sinks hand over their final rows.
        let faults = Faults::default();
        faults.delay_async_writes(Duration::from_millis(20));
        run(FAST, 2, &data, &output, Until::End, Moves::None, faults).unwrap();
        assert_eq!(lines_of(&output), expected, "round {round}: the whole run");
        // What a crash just before the finished manifest leaves behind.
        let epochs = checkpoint::manifest_epochs(&data).unwrap();
        let newest = *epochs.last().unwrap();
        std::fs::remove_file(
            data.join("checkpoints")
                .join(format!("MANIFEST-{newest:020}")),
        )
        .unwrap();
        run(
            FAST,
            2,
            &data,
            &output,
            Until::End,
            Moves::None,
            Faults::default(),
        )
        .unwrap();
        assert_eq!(
            lines_of(&output),
            expected,
            "round {round}: resumed from the checkpoint before the end"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

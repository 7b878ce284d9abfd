//! What the runs of each node cost in CPU, and the leader's use of it.
//!
//! Every node measures the CPU time of its own runs (`/proc/PID/stat`:
//! user and system time of all the run's threads) every
//! [`SAMPLE_EVERY`], smoothed ([`CpuMeter`]), and tells the leader with
//! each lease request ([`encode_request`]: its cores, then per part the
//! job's submission number and the thousandths of a core it used). The
//! leader keeps the latest report of each node for [`REPORT_FRESH`], and
//! weighs each node by the CPU of the parts it runs ([`Load`]; a part not
//! measured yet, or of a node whose report is stale, counts
//! [`UNMEASURED_MILLI`]). New placements take the least loaded nodes by
//! that weight, and the leader moves a part from a busy node to an idle
//! one ([`rebalance`]). By each node's cores it also sizes a job's span:
//! a job that fits on fewer nodes with room to spare is narrowed onto
//! them ([`holds`]), and one narrowed onto a node that is then saturated
//! ([`saturated`]) widens again.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How often a node samples its runs' CPU time.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// A node's report counts this long after it arrived.
pub const REPORT_FRESH: Duration = Duration::from_secs(1);
/// What a part not measured yet weighs: a quarter of a core.
pub const UNMEASURED_MILLI: u32 = 250;
/// The leader moves a part for load when the busiest node's weight is at
/// least this much over the idlest's (half a core)...
pub const LOAD_GAP_MILLI: u32 = 500;
/// ...and the move narrows that gap by at least this much.
pub const LOAD_GAIN_MILLI: u32 = 250;
/// A job moved for load is not moved for load again within this.
pub const LOAD_MOVE_QUIET: Duration = Duration::from_secs(30);
/// Parts a lease request reports at most.
pub const REPORTED_PARTS_MAX: usize = 64;
/// A job is narrowed onto fewer nodes once it has fit on them (by
/// [`holds`]) for this long in its placement (`dirigo node
/// --narrow-after-ms`).
pub const NARROW_AFTER: Duration = Duration::from_secs(30);
/// A node takes a narrowed job only if, with it, its parts use at most
/// this share of its cores...
pub const NARROW_FILL: (u32, u32) = (1, 2);
/// ...and a node whose parts use this share of its cores or more is
/// saturated: a job narrowed onto it widens again. Between the two, a job
/// stays as it is.
pub const SATURATED: (u32, u32) = (17, 20);
/// A job's latency (its parts' output latency p99, in thousandths of its
/// SLO) over this runs late...
pub const SLO_PERMILLE: u32 = 1_000;
/// ...and one at most this leaves room in its SLO: only such a job (or
/// one whose latency is not known) is narrowed.
pub const SLO_ROOM_PERMILLE: u32 = 500;
/// A job that has run late for this long in its placement is answered: a
/// narrowed one widens again, another's part leaves a busy node. Longer
/// than one late figure lasts (`jobs::LATENCY_FRESH` on its node, then
/// [`REPORT_FRESH`] at the leader): one late second alone is not enough.
pub const LATE_AFTER: Duration = Duration::from_secs(5);
/// A job answered for running late is neither narrowed nor answered again
/// within this: a job whose SLO no placement meets is moved once in it,
/// not every time it is free to move.
pub const LATE_HOLD: Duration = Duration::from_secs(600);

/// The weight of one node: the parts of running jobs it has, and the
/// CPU they use, in thousandths of a core (measured, or
/// [`UNMEASURED_MILLI`] a part), and how many of them are not measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub parts: usize,
    pub milli: u32,
    pub unmeasured: usize,
}

impl Load {
    /// One more part, of `milli` as measured, or not measured (None).
    pub fn add(&mut self, milli: Option<u32>) {
        self.parts += 1;
        self.unmeasured += usize::from(milli.is_none());
        let milli = milli.unwrap_or(UNMEASURED_MILLI);
        self.milli = self.milli.saturating_add(milli);
    }

    /// One part fewer, of `milli` as `add` took it.
    pub fn remove(&mut self, milli: Option<u32>) {
        self.parts = self.parts.saturating_sub(1);
        self.unmeasured = self.unmeasured.saturating_sub(usize::from(milli.is_none()));
        let milli = milli.unwrap_or(UNMEASURED_MILLI);
        self.milli = self.milli.saturating_sub(milli);
    }
}

/// What a lease request says besides its number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// The cores the node's runs may use (0: not said).
    pub cores: u16,
    /// Per job (by submission number), the thousandths of a core its part
    /// there uses, for the parts measured.
    pub parts: BTreeMap<u64, u32>,
    /// Per job (by submission number), its part's output latency p99
    /// lately, in thousandths of the job's SLO (1,000: at the SLO), for
    /// the parts that had output rows lately.
    pub latency: BTreeMap<u64, u32>,
}

/// The job number a lease request's cores ride under: no job has it (a
/// leader of a build before cores were reported reads the entry as a
/// part of a job it does not know, and passes over it).
pub const CORES_ENTRY: u64 = u64::MAX;

/// A lease request's entry of a job's latency is its submission number
/// with this bit set (no job's number has it: a leader of a build before
/// latency was reported reads it as a part of a job it does not know).
pub const LATENCY_ENTRY: u64 = 1 << 62;

/// A lease request: its number (`u64`), then its parts' CPU: a count
/// (`u16`), then per part the job's submission number (`u64`) and its
/// thousandths of a core (`u32`), little endian; at most
/// [`REPORTED_PARTS_MAX`] entries, the first the node's cores
/// ([`Report::cores`]) under [`CORES_ENTRY`] (0 cores: none said), then the parts' CPU, then their
/// latency ([`Report::latency`], each under its number with
/// [`LATENCY_ENTRY`] set), as many as there is room for.
pub fn encode_request(seq: u64, report: &Report) -> Vec<u8> {
    let cores = (report.cores > 0).then_some((CORES_ENTRY, u32::from(report.cores)));
    let job = |(n, _): &(&u64, &u32)| **n & LATENCY_ENTRY == 0;
    let parts: Vec<(u64, u32)> = cores
        .into_iter()
        .chain(report.parts.iter().filter(job).map(|(n, m)| (*n, *m)))
        .chain(
            report
                .latency
                .iter()
                .filter(job)
                .map(|(n, p)| (n | LATENCY_ENTRY, *p)),
        )
        .take(REPORTED_PARTS_MAX)
        .collect();
    let mut body = Vec::with_capacity(10 + 12 * parts.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(&(parts.len() as u16).to_le_bytes());
    for (number, milli) in parts {
        body.extend_from_slice(&number.to_le_bytes());
        body.extend_from_slice(&milli.to_le_bytes());
    }
    body
}

/// A lease request's number and its report (an empty one from a request
/// of its number alone); None when it is not one (the wrong length for its
/// count, or a count over the bound).
pub fn decode_request(body: &[u8]) -> Option<(u64, Report)> {
    let seq = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    if body.len() == 8 {
        return Some((seq, Report::default()));
    }
    let count = usize::from(u16::from_le_bytes(body.get(8..10)?.try_into().ok()?));
    if count > REPORTED_PARTS_MAX || body.len() != 10 + 12 * count {
        return None;
    }
    let mut parts: BTreeMap<u64, u32> = body[10..]
        .chunks_exact(12)
        .map(|part| {
            let number = u64::from_le_bytes(part[..8].try_into().expect("8 bytes"));
            let milli = u32::from_le_bytes(part[8..].try_into().expect("4 bytes"));
            (number, milli)
        })
        .collect();
    let cores = parts
        .remove(&CORES_ENTRY)
        .map_or(0, |c| c.min(u32::from(u16::MAX)) as u16);
    // Keys with bit 62 set and bit 63 clear; those with bit 63 are no
    // entry this build knows.
    let mut latency_entries = parts.split_off(&LATENCY_ENTRY);
    latency_entries.split_off(&(1 << 63));
    let latency = latency_entries
        .into_iter()
        .map(|(n, p)| (n & !LATENCY_ENTRY, p))
        .collect();
    Some((
        seq,
        Report {
            cores,
            parts,
            latency,
        },
    ))
}

/// The thousandths of a core a node of `cores` cores has.
fn capacity_milli(cores: u16) -> u32 {
    u32::from(cores) * 1_000
}

/// Whether a node of `cores` cores (None: not known) weighing `load` is
/// saturated: every part on it measured, and using at least [`SATURATED`]
/// of its cores.
pub fn saturated(load: &Load, cores: Option<u16>) -> bool {
    let Some(cores) = cores.filter(|c| *c > 0) else {
        return false;
    };
    let (num, den) = SATURATED;
    load.unmeasured == 0
        && u64::from(load.milli) * u64::from(den)
            >= u64::from(capacity_milli(cores)) * u64::from(num)
}

/// Whether a node of `cores` cores (None: not known) weighing `load` (the
/// job's own part there, if any, left out) holds a part of a job of
/// `shards` shards that uses `milli`: a core for each shard, every part
/// on it measured (a guess holds nothing), and with the part at most
/// [`NARROW_FILL`] of its cores used.
pub fn holds(load: &Load, cores: Option<u16>, shards: u64, milli: u32) -> bool {
    let Some(cores) = cores.filter(|c| *c > 0) else {
        return false;
    };
    let (num, den) = NARROW_FILL;
    let used = u64::from(load.milli) + u64::from(milli);
    shards <= u64::from(cores)
        && load.unmeasured == 0
        && used * u64::from(den) <= u64::from(capacity_milli(cores)) * u64::from(num)
}

/// The user and system CPU time of process `pid` so far, in clock ticks
/// (`/proc/PID/stat`, fields 14 and 15: every thread of it).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ticks(&stat)
}

/// Fields 14 and 15 of a `/proc/PID/stat` line, summed. The second field
/// (the command, in parentheses) may hold spaces and parentheses: the
/// fields are counted from its last `)`.
fn parse_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the command: field 3 (state) is the first.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Clock ticks a second (`sysconf(_SC_CLK_TCK)`; 100 where it says
/// nothing).
fn ticks_per_s() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    ticks: u64,
    at: Instant,
    /// Smoothed thousandths of a core; None before a whole interval.
    milli: Option<u32>,
}

/// The CPU this node's runs use, per job: sampled every
/// [`SAMPLE_EVERY`], each new figure averaged with the one before
/// (half each), so that a run's figure follows a change within a second
/// or two.
#[derive(Debug)]
pub struct CpuMeter {
    /// Per run (job, placement epoch, process).
    samples: HashMap<(String, u64, u32), Sample>,
    last: Option<Instant>,
    ticks_per_s: u64,
}

impl Default for CpuMeter {
    fn default() -> Self {
        CpuMeter {
            samples: HashMap::new(),
            last: None,
            ticks_per_s: ticks_per_s(),
        }
    }
}

impl CpuMeter {
    /// Sample `runs` (job, epoch, pid) if [`SAMPLE_EVERY`] passed since the
    /// last time (they are not gone through otherwise); runs no longer
    /// given are forgotten.
    pub fn sample<'a>(
        &mut self,
        runs: impl IntoIterator<Item = (&'a str, u64, u32)>,
        now: Instant,
    ) {
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < SAMPLE_EVERY)
        {
            return;
        }
        self.last = Some(now);
        let read: Vec<_> = runs
            .into_iter()
            .filter_map(|(job, epoch, pid)| {
                cpu_ticks(pid).map(|ticks| ((job.to_string(), epoch, pid), ticks))
            })
            .collect();
        self.take(read, now);
    }

    /// What `sample` read: each run's ticks at `now`.
    fn take(&mut self, read: Vec<((String, u64, u32), u64)>, now: Instant) {
        let mut samples = HashMap::with_capacity(read.len());
        for (key, ticks) in read {
            let sample = match self.samples.get(&key) {
                Some(before) if now > before.at && ticks >= before.ticks => {
                    let seconds = now.duration_since(before.at).as_secs_f64();
                    let cores = (ticks - before.ticks) as f64 / self.ticks_per_s as f64 / seconds;
                    let new = (cores * 1000.0).round().min(f64::from(u32::MAX)) as u32;
                    let milli = match before.milli {
                        Some(old) => ((u64::from(old) + u64::from(new)) / 2) as u32,
                        None => new,
                    };
                    Sample {
                        ticks,
                        at: now,
                        milli: Some(milli),
                    }
                }
                _ => Sample {
                    ticks,
                    at: now,
                    milli: None,
                },
            };
            samples.insert(key, sample);
        }
        self.samples = samples;
    }

    /// Per job: the thousandths of a core its run here uses (measured ones
    /// only).
    pub fn parts(&self) -> BTreeMap<String, u32> {
        let mut parts = BTreeMap::new();
        for ((job, _, _), sample) in &self.samples {
            if let Some(milli) = sample.milli {
                let sum = parts.entry(job.clone()).or_insert(0u32);
                *sum = sum.saturating_add(milli);
            }
        }
        parts
    }
}

/// A move for load: `job`'s part on `from` goes to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadMove {
    pub job: String,
    pub from: u64,
    pub to: u64,
    /// The part's CPU, and both nodes' weights before the move.
    pub part_milli: u32,
    pub from_milli: u32,
    pub to_milli: u32,
}

/// The leader's move for load, if one is worth a restart: every part on
/// the busiest node by weight and on the idlest is measured (a part just
/// placed or moved, or of a node whose report is stale or was never had,
/// as after an election, weighs a guess), the busiest is at least
/// [`LOAD_GAP_MILLI`] over the idlest, and one
/// of its parts (`candidates`: the jobs that may move, with each node of
/// their placement and their part's CPU there where measured; only a
/// measured part moves, and none to a node its job is on) narrows that gap
/// by at least
/// [`LOAD_GAIN_MILLI`] where it goes (the one that narrows it most; a part
/// larger than the gap would only turn it around). After such a move the
/// gap is less than it was by the gain; if the move turned the pair
/// around, the new gap (twice the part less the old gap) is less than the
/// part, and otherwise the part's new node is still the idler one: either
/// way the rule does not move it straight back.
pub fn rebalance(
    load: &BTreeMap<u64, Load>,
    candidates: &[(String, BTreeMap<u64, Option<u32>>)],
) -> Option<LoadMove> {
    let (&from, busiest) = load
        .iter()
        .max_by_key(|(id, l)| (l.milli, std::cmp::Reverse(**id)))?;
    let (&to, idlest) = load.iter().min_by_key(|(id, l)| (l.milli, **id))?;
    let gap = busiest.milli.saturating_sub(idlest.milli);
    if from == to || gap < LOAD_GAP_MILLI || busiest.unmeasured > 0 || idlest.unmeasured > 0 {
        return None;
    }
    candidates
        .iter()
        .filter(|(_, parts)| !parts.contains_key(&to))
        .filter_map(|(job, parts)| {
            let part = (*parts.get(&from)?)?;
            // The gap after the move is |gap - 2 part|.
            let gain = 2 * part.min(gap.saturating_sub(part));
            (part < gap && gain >= LOAD_GAIN_MILLI).then_some((gain, job, part))
        })
        // Of equal gains, the smaller part (less to restore), then the
        // first job by name.
        .max_by_key(|&(gain, job, part)| (gain, std::cmp::Reverse(part), std::cmp::Reverse(job)))
        .map(|(_, job, part)| LoadMove {
            job: job.clone(),
            from,
            to,
            part_milli: part,
            from_milli: busiest.milli,
            to_milli: idlest.milli,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes a peer sends as a lease request: no panic, and a
        /// report only within the bounds; any report the node makes
        /// decodes as it was made, cut to the bound.
        #[test]
        fn any_lease_request_decodes_without_a_panic_and_any_report_round_trips(
            bytes in proptest::collection::vec(any::<u8>(), 0..1_200),
            cores in any::<u16>(),
            parts in proptest::collection::btree_map(0u64..1 << 40, any::<u32>(), 0..40),
            latency in proptest::collection::btree_map(0u64..1 << 40, any::<u32>(), 0..40),
        ) {
            if let Some((_, report)) = decode_request(&bytes) {
                prop_assert!(report.parts.len() + report.latency.len() <= REPORTED_PARTS_MAX);
                prop_assert!(report.latency.keys().all(|n| n & (LATENCY_ENTRY | 1 << 63) == 0));
            }
            let report = Report { cores, parts, latency };
            let (seq, got) = decode_request(&encode_request(7, &report)).expect("decodes");
            prop_assert_eq!(seq, 7);
            prop_assert_eq!(got.cores, report.cores);
            let kept = REPORTED_PARTS_MAX - usize::from(report.cores > 0);
            let parts_kept = report.parts.len().min(kept);
            prop_assert_eq!(got.parts.len(), parts_kept);
            prop_assert_eq!(got.latency.len(), report.latency.len().min(kept - parts_kept));
            prop_assert!(got.parts.iter().all(|(n, m)| report.parts.get(n) == Some(m)));
            prop_assert!(got.latency.iter().all(|(n, p)| report.latency.get(n) == Some(p)));
        }
    }

    #[test]
    fn a_report_decodes_as_encoded_and_a_malformed_one_not_at_all() {
        let parts: BTreeMap<u64, u32> = [(3, 1_250), (7, 0), (LATENCY_ENTRY - 1, u32::MAX)].into();
        let latency: BTreeMap<u64, u32> = [(3, 420), (9, 1_000_000)].into();
        let report = Report {
            cores: 16,
            parts: parts.clone(),
            latency: latency.clone(),
        };
        let body = encode_request(42, &report);
        assert_eq!(decode_request(&body), Some((42, report.clone())));
        let cores_only = Report {
            cores: 2,
            ..Report::default()
        };
        assert_eq!(
            decode_request(&encode_request(1, &cores_only)),
            Some((1, cores_only))
        );
        // A number alone says nothing more; no cores, none said.
        assert_eq!(
            decode_request(&7u64.to_le_bytes()),
            Some((7, Report::default()))
        );
        let no_cores = Report {
            cores: 0,
            ..report.clone()
        };
        assert_eq!(
            decode_request(&encode_request(3, &no_cores)),
            Some((3, no_cores))
        );
        // The cores and the latency ride as entries a decoder that knows
        // neither reads as parts of jobs nobody has: the format is the one
        // before them.
        let count = u16::from_le_bytes(body[8..10].try_into().unwrap());
        assert_eq!(usize::from(count), 1 + parts.len() + latency.len());
        assert_eq!(body.len(), 10 + 12 * usize::from(count));
        assert_eq!(body[10..18], CORES_ENTRY.to_le_bytes());
        let last = &body[body.len() - 12..];
        assert_eq!(last[..8], (9 | LATENCY_ENTRY).to_le_bytes());
        assert_eq!(last[8..], 1_000_000u32.to_le_bytes());
        // An entry with bit 63 set is none this build knows: neither a
        // part nor a latency.
        let unknown = Report {
            cores: 0,
            parts: [(1 << 63 | 5, 7), (3, 9)].into(),
            latency: BTreeMap::new(),
        };
        let (_, got) = decode_request(&encode_request(5, &unknown)).unwrap();
        assert_eq!(got.parts, [(3, 9)].into());
        assert!(got.latency.is_empty());
        // Short, long, a count that does not match, a count over the bound.
        assert_eq!(decode_request(&body[..9]), None);
        assert_eq!(decode_request(&body[..body.len() - 1]), None);
        let mut long = body.clone();
        long.push(0);
        assert_eq!(decode_request(&long), None);
        let mut over = 1u64.to_le_bytes().to_vec();
        over.extend_from_slice(&((REPORTED_PARTS_MAX + 1) as u16).to_le_bytes());
        over.resize(10 + 12 * (REPORTED_PARTS_MAX + 1), 0);
        assert_eq!(decode_request(&over), None);
        // At most the bound is reported: the cores, then the CPU, then the
        // latency as there is room.
        let many: BTreeMap<u64, u32> = (0..100).map(|n| (n, 1)).collect();
        let full = Report {
            cores: 4,
            parts: many.clone(),
            latency: many.clone(),
        };
        let (_, got) = decode_request(&encode_request(9, &full)).unwrap();
        assert_eq!(got.parts.len(), REPORTED_PARTS_MAX - 1);
        assert!(got.latency.is_empty());
        assert_eq!(got.cores, 4);
        let few = Report {
            cores: 0,
            parts: (0..10).map(|n| (n, 1)).collect(),
            latency: many,
        };
        let (_, got) = decode_request(&encode_request(9, &few)).unwrap();
        assert_eq!(got.parts.len(), 10);
        assert_eq!(got.latency.len(), REPORTED_PARTS_MAX - 10);
        assert_eq!(got.latency.keys().next(), Some(&0));
    }

    /// A node holds a narrowed part only with a core per shard, its own
    /// parts measured, and half its cores or less used with it; it is
    /// saturated from 0.85 of its cores, measured; unknown cores hold
    /// nothing and saturate never.
    #[test]
    fn a_node_holds_a_part_within_half_its_cores_and_saturates_at_most_of_them() {
        let load = |milli, unmeasured| Load {
            parts: 1,
            milli,
            unmeasured,
        };
        assert!(holds(&load(400, 0), Some(2), 2, 600));
        assert!(!holds(&load(400, 0), Some(2), 2, 601));
        assert!(!holds(&load(0, 0), Some(2), 3, 100), "a core per shard");
        assert!(holds(&Load::default(), Some(4), 3, 1_900));
        assert!(
            !holds(&load(250, 1), Some(8), 2, 100),
            "a guess holds nothing"
        );
        assert!(!holds(&Load::default(), None, 1, 0));
        assert!(!holds(&Load::default(), Some(0), 1, 0));
        assert!(saturated(&load(1_700, 0), Some(2)));
        assert!(!saturated(&load(1_699, 0), Some(2)));
        assert!(
            !saturated(&load(1_900, 1), Some(2)),
            "a guess saturates nothing"
        );
        assert!(!saturated(&load(u32::MAX, 0), None));
        assert!(saturated(&load(u32::MAX, 0), Some(u16::MAX)));
    }

    #[test]
    fn the_ticks_are_read_past_a_command_with_spaces_and_parentheses() {
        let stat = "1234 (dirigo (run) x) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 9";
        assert_eq!(parse_ticks(stat), Some(267));
        assert_eq!(parse_ticks("1234 (short) S 1 2"), None);
        // This process's own line parses.
        assert!(cpu_ticks(std::process::id()).is_some());
    }

    /// A run's figure: none after its first sample, the rate over the
    /// interval after the second, then half the old and half the new;
    /// runs gone are forgotten.
    #[test]
    fn the_meter_averages_each_interval_with_the_one_before() {
        let mut meter = CpuMeter {
            ticks_per_s: 100,
            ..CpuMeter::default()
        };
        let t0 = Instant::now();
        let key = |job: &str| (job.to_string(), 1, 10);
        meter.take(vec![(key("a"), 1_000), (key("b"), 50)], t0);
        assert!(meter.parts().is_empty());
        // a: 50 ticks in 0.5 s = 1 core; b: none.
        let t1 = t0 + Duration::from_millis(500);
        meter.take(vec![(key("a"), 1_050), (key("b"), 50)], t1);
        assert_eq!(meter.parts(), [("a".into(), 1_000), ("b".into(), 0)].into());
        // a: 10 ticks in 0.5 s = 0.2 core, averaged with 1 core.
        let t2 = t1 + Duration::from_millis(500);
        meter.take(vec![(key("a"), 1_060)], t2);
        assert_eq!(meter.parts(), [("a".into(), 600)].into());
    }

    /// Nodes of measured parts: (id, parts, milli).
    fn loads(of: &[(u64, usize, u32)]) -> BTreeMap<u64, Load> {
        of.iter()
            .map(|&(id, parts, milli)| {
                let load = Load {
                    parts,
                    milli,
                    unmeasured: 0,
                };
                (id, load)
            })
            .collect()
    }

    fn job(name: &str, parts: &[(u64, u32)]) -> (String, BTreeMap<u64, Option<u32>>) {
        let parts = parts.iter().map(|&(node, milli)| (node, Some(milli)));
        (name.to_string(), parts.collect())
    }

    /// The part that halves the gap best moves; one that would turn it
    /// around, or gain little, does not; a small gap moves nothing.
    #[test]
    fn the_part_that_narrows_the_gap_most_moves_to_the_idlest_node() {
        let load = loads(&[(1, 3, 1_900), (2, 1, 100), (3, 1, 400)]);
        let candidates = [
            job("heavy", &[(1, 1_700)]),
            job("middle", &[(1, 150)]),
            job("small", &[(1, 50)]),
            job("elsewhere", &[(3, 400)]),
        ];
        // Gap 1,800: heavy gains 2 x 100, middle 300, small 100.
        let chosen = rebalance(&load, &candidates).unwrap();
        assert_eq!(
            chosen,
            LoadMove {
                job: "middle".into(),
                from: 1,
                to: 2,
                part_milli: 150,
                from_milli: 1_900,
                to_milli: 100,
            }
        );
        // A job already on the idlest does not move there, measured there
        // or not; a part not measured does not move.
        let on_both = [job("middle", &[(1, 150), (2, 50)])];
        assert_eq!(rebalance(&load, &on_both), None);
        let unmeasured_there = [(
            "middle".to_string(),
            [(1, Some(150)), (2, None)].into_iter().collect(),
        )];
        assert_eq!(rebalance(&load, &unmeasured_there), None);
        let unmeasured = [("middle".to_string(), [(1, None)].into_iter().collect())];
        assert_eq!(rebalance(&load, &unmeasured), None);
        // A gap under the bound moves nothing.
        let close = loads(&[(1, 2, 700), (2, 1, 300)]);
        assert_eq!(rebalance(&close, &[job("a", &[(1, 350)])]), None);
        // A part not measured on either node: no move for load (its
        // weight is a guess).
        for node in [1, 2] {
            let mut guessed = load.clone();
            guessed.get_mut(&node).unwrap().unmeasured = 1;
            assert_eq!(rebalance(&guessed, &candidates), None, "node {node}");
        }
        // No node, one node: nothing.
        assert_eq!(rebalance(&BTreeMap::new(), &candidates), None);
        assert_eq!(rebalance(&loads(&[(1, 3, 1_900)]), &candidates), None);
    }

    /// After a move, the same rule does not move the part straight back:
    /// a part that turned the pair around is larger than the gap it left,
    /// one that did not is on the idler node.
    #[test]
    fn a_move_for_load_is_not_undone_by_the_next() {
        // Turned around: 2.0 and 0 cores; the part of 1.8 moves (gain 0.4;
        // the other part, of 0.2, may not move), leaving 0.2 and 1.8: the
        // gap (1.6) is less than the part.
        let mut load = loads(&[(1, 2, 2_000), (2, 0, 0)]);
        let mut candidates = vec![job("x", &[(1, 1_800)])];
        let first = rebalance(&load, &candidates).unwrap();
        assert_eq!((first.job.as_str(), first.to), ("x", 2));
        load.get_mut(&1).unwrap().remove(Some(1_800));
        load.get_mut(&2).unwrap().add(Some(1_800));
        candidates[0] = job("x", &[(2, 1_800)]);
        assert_eq!(rebalance(&load, &candidates), None);
        // Not turned around: 3.0 and 0; the part of 1.2 moves (gain 2.4),
        // leaving 1.8 and 1.2: the gap (0.6) is under either part left,
        // and the part moved is on the idler node.
        let mut load = loads(&[(1, 3, 3_000), (2, 0, 0)]);
        let mut candidates = vec![
            job("a", &[(1, 1_200)]),
            job("b", &[(1, 1_000)]),
            job("c", &[(1, 800)]),
        ];
        let first = rebalance(&load, &candidates).unwrap();
        assert_eq!((first.job.as_str(), first.to), ("a", 2));
        load.get_mut(&1).unwrap().remove(Some(1_200));
        load.get_mut(&2).unwrap().add(Some(1_200));
        candidates[0] = job("a", &[(2, 1_200)]);
        assert_eq!(rebalance(&load, &candidates), None);
    }
}

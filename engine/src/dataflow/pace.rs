//! Rate schedules: how fast a paced job's sources produce, as a function of time.
//!
//! A schedule is a list of steps, each a rate (records per second) held for a
//! duration in whole milliseconds; the last step holds until the input ends
//! (its duration, if the user gave one, is not kept). A constant rate is a
//! schedule of one step. The same schedule serves two readers, and this module
//! keeps them consistent:
//!
//! - a source generator gives record `n` the *scheduled emission offset* of
//!   `n` ([`RateSchedule::offset_ms`]) as its event time, a function of `n`
//!   alone, so a run stays replayable and splittable across partitions;
//! - the engine's source pacing produces in wall time what the schedule has
//!   made due ([`RateSchedule::records_due`], [`RateSchedule::due_ns`]).
//!
//! Step `i` starts at `start_ms(i)` (the sum of the durations before it) with
//! record `first(i)`; it holds `ceil(per_s * duration_ms / 1000)` records, the
//! ones whose exact offset `start + (n - first) / per_s` falls inside it. Record
//! `n` of step `i` is due at `start_ms(i) + floor((n - first(i)) * 1000 /
//! per_s)` ms: for one step that is `floor(n * 1000 / per_s)`, the event time
//! of a constant nominal rate. Offsets never go backwards (the last record of a
//! step is due before the next step starts, the next step's first record at its
//! start).

use std::fmt;

/// Steps one schedule holds at most.
pub const RATE_STEPS_MAX: usize = 1024;

/// One step as given: `per_s` records per second for `duration_ms` (ignored
/// for the last step, which holds until the input ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateStep {
    pub per_s: u64,
    pub duration_ms: u64,
}

/// A step with where it starts, in time and in records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Step {
    per_s: u64,
    /// `u64::MAX` for the last step.
    duration_ms: u64,
    start_ms: u64,
    /// Number of the step's first record.
    first: u64,
}

/// A validated rate schedule (see the module header). Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateSchedule {
    steps: Vec<Step>,
}

impl RateSchedule {
    /// `per_s` records per second for ever. Panics on 0, which is no rate.
    pub fn constant(per_s: u64) -> RateSchedule {
        assert!(per_s > 0, "a rate is at least 1 record per second");
        RateSchedule {
            steps: vec![Step {
                per_s,
                duration_ms: u64::MAX,
                start_ms: 0,
                first: 0,
            }],
        }
    }

    /// The schedule of `steps`, or why they are not one: no step, too many, a
    /// last step of rate 0 (the input would never end), a step before the
    /// last with no duration. A step of rate 0 before the last is a pause: it
    /// holds no record, and the next record is due when it ends.
    pub fn new(steps: &[RateStep]) -> Result<RateSchedule, String> {
        if steps.is_empty() {
            return Err("a rate schedule needs at least one step".into());
        }
        if steps.len() > RATE_STEPS_MAX {
            return Err(format!(
                "a rate schedule has at most {RATE_STEPS_MAX} steps, not {}",
                steps.len()
            ));
        }
        let last = steps.len() - 1;
        let (mut start_ms, mut first) = (0u64, 0u64);
        let mut out = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            if step.per_s == 0 && i == last {
                return Err(format!(
                    "step {} of the rate schedule, the last, has rate 0: the input would never \
                     end (a pause of rate 0 must be followed by a step with a rate)",
                    i + 1
                ));
            }
            if i < last && step.duration_ms == 0 {
                return Err(format!(
                    "step {} of the rate schedule lasts 0 ms: every step but the last needs a \
                     duration above zero",
                    i + 1
                ));
            }
            let duration_ms = if i < last { step.duration_ms } else { u64::MAX };
            out.push(Step {
                per_s: step.per_s,
                duration_ms,
                start_ms,
                first,
            });
            let records = u128::from(step.per_s) * u128::from(duration_ms);
            let records = records.div_ceil(1000).min(u128::from(u64::MAX)) as u64;
            start_ms = start_ms.saturating_add(duration_ms);
            first = first.saturating_add(records);
        }
        Ok(RateSchedule { steps: out })
    }

    /// The steps, the last one's duration `u64::MAX`.
    pub fn steps(&self) -> impl Iterator<Item = RateStep> + '_ {
        self.steps.iter().map(|s| RateStep {
            per_s: s.per_s,
            duration_ms: s.duration_ms,
        })
    }

    /// The same schedule for one of `parts` partitions that share it: every
    /// step's rate divided among them (at least 1 per second each; a pause
    /// stays a pause).
    pub fn per_partition(&self, parts: u32) -> RateSchedule {
        let steps: Vec<RateStep> = self
            .steps()
            .map(|s| RateStep {
                per_s: match s.per_s {
                    0 => 0,
                    per_s => (per_s / u64::from(parts.max(1))).max(1),
                },
                ..s
            })
            .collect();
        RateSchedule::new(&steps).expect("a valid schedule divided stays valid")
    }

    /// Index of the step that holds record `n` (never a pause: a pause shares
    /// its first record number with the step after it, which holds it).
    fn step_of_record(&self, n: u64) -> usize {
        self.steps.partition_point(|s| s.first <= n) - 1
    }

    /// Where record `n` stands: its step's index, the step's start (ms) and
    /// the records of the step before `n`.
    pub fn locate(&self, n: u64) -> (usize, u64, u64) {
        let i = self.step_of_record(n);
        let step = &self.steps[i];
        (i, step.start_ms, n - step.first)
    }

    /// Rate of step `i` and the records it holds (`u64::MAX`: the last step).
    pub fn step_span(&self, i: usize) -> (u64, u64) {
        let step = &self.steps[i];
        let records = match self.steps.get(i + 1) {
            Some(next) => next.first - step.first,
            None => u64::MAX,
        };
        (step.per_s, records)
    }

    /// Scheduled emission offset of record `n` from the start, in ms (floored).
    pub fn offset_ms(&self, n: u64) -> u64 {
        let (i, start_ms, k) = self.locate(n);
        let per_s = u128::from(self.steps[i].per_s);
        let within = (u128::from(k) * 1000 / per_s).min(u128::from(u64::MAX)) as u64;
        start_ms.saturating_add(within)
    }

    /// Index of the step running `elapsed_ns` after the start.
    fn step_at(&self, elapsed_ns: u64) -> usize {
        let elapsed_ms = elapsed_ns / 1_000_000;
        self.steps.partition_point(|s| s.start_ms <= elapsed_ms) - 1
    }

    /// The rate in force `elapsed_ns` after the start.
    pub fn per_s_at(&self, elapsed_ns: u64) -> u64 {
        self.steps[self.step_at(elapsed_ns)].per_s
    }

    /// Records due by `elapsed_ns` after the start: those of the steps before,
    /// and `floor(t * per_s)` of the current one, `t` its time so far.
    pub fn records_due(&self, elapsed_ns: u64) -> u64 {
        let i = self.step_at(elapsed_ns);
        let step = &self.steps[i];
        let (_, records) = self.step_span(i);
        let into_ns = elapsed_ns - step.start_ms.saturating_mul(1_000_000);
        let within = u128::from(into_ns) * u128::from(step.per_s) / 1_000_000_000;
        step.first
            .saturating_add((within.min(u128::from(records))) as u64)
    }

    /// The earliest time after the start (ns) at which `records` are due
    /// (`records_due(due_ns(r)) >= r`).
    pub fn due_ns(&self, records: u64) -> u64 {
        let last = self.steps.len() - 1;
        for (i, step) in self.steps.iter().enumerate() {
            let k = u128::from(records.saturating_sub(step.first));
            if step.per_s == 0 && k > 0 {
                continue; // a pause makes nothing due
            }
            let at_ns = (k * 1_000_000_000).div_ceil(u128::from(step.per_s.max(1)));
            let duration_ns = u128::from(step.duration_ms) * 1_000_000;
            if i == last || at_ns < duration_ns {
                let start_ns = u128::from(step.start_ms) * 1_000_000;
                return (start_ns + at_ns).min(u128::from(u64::MAX)) as u64;
            }
        }
        unreachable!("the last step always answers")
    }
}

/// The canonical form, which parses back to the same schedule: steps
/// `RATE/DURATION` separated by commas, durations in `s` when whole seconds
/// and in `ms` otherwise, the last step a bare rate. A constant rate is its
/// number alone.
impl fmt::Display for RateSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.steps.len() - 1;
        for (i, step) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", step.per_s)?;
            if i < last {
                match step.duration_ms % 1000 {
                    0 => write!(f, "/{}s", step.duration_ms / 1000)?,
                    _ => write!(f, "/{}ms", step.duration_ms)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(steps: &[(u64, u64)]) -> RateSchedule {
        let steps: Vec<RateStep> = steps
            .iter()
            .map(|&(per_s, duration_ms)| RateStep { per_s, duration_ms })
            .collect();
        RateSchedule::new(&steps).unwrap()
    }

    #[test]
    fn one_step_is_the_constant_rate() {
        for per_s in [1, 3, 7, 1000, 200_000, 10_000_000] {
            let constant = RateSchedule::constant(per_s);
            assert_eq!(constant, schedule(&[(per_s, 5000)]));
            for n in (0..100_000).step_by(37).chain([1 << 40, u64::MAX / 2000]) {
                assert_eq!(
                    constant.offset_ms(n),
                    n * 1000 / per_s,
                    "rate {per_s}, n {n}"
                );
            }
            for t in [0, 1, 999_999, 1_000_000_000, 12_345_678_901] {
                let today = (u128::from(t) * u128::from(per_s) / 1_000_000_000) as u64;
                assert_eq!(constant.records_due(t), today, "rate {per_s}, t {t}");
            }
        }
    }

    #[test]
    fn offsets_are_monotone_and_follow_each_step() {
        let s = schedule(&[(50_000, 1000), (3_000_000, 2000), (50_000, 2000)]);
        // 50,000 records in the first second, 6M in the next two.
        assert_eq!(s.offset_ms(0), 0);
        assert_eq!(s.offset_ms(49_999), 999);
        assert_eq!(s.offset_ms(50_000), 1000);
        assert_eq!(s.offset_ms(50_000 + 5_999_999), 2999);
        assert_eq!(s.offset_ms(6_050_000), 3000);
        assert_eq!(s.offset_ms(6_050_000 + 50_000), 4000);
        let mut last = 0;
        for n in (0..7_000_000).step_by(7) {
            let offset = s.offset_ms(n);
            assert!(offset >= last, "offset went back at {n}");
            last = offset;
        }
        // A step whose duration is not a whole number of records: 3/s for
        // 500 ms holds ceil(1.5) = 2 records (at 0 and 333 ms).
        let s = schedule(&[(3, 500), (1000, 1)]);
        assert_eq!(
            (0..4).map(|n| s.offset_ms(n)).collect::<Vec<_>>(),
            vec![0, 333, 500, 501]
        );
    }

    #[test]
    fn pacing_meets_the_offsets() {
        let s = schedule(&[(50_000, 1000), (3_000_000, 2000), (7, 1500), (50_000, 1)]);
        let mut last = 0;
        for t in (0..6_000_000_000u64).step_by(999_983) {
            let due = s.records_due(t);
            assert!(due >= last, "records_due went back at {t} ns");
            last = due;
        }
        for records in (0..6_200_000u64)
            .step_by(997)
            .chain([1, 50_000, 50_001, 6_050_000])
        {
            let at = s.due_ns(records);
            assert!(s.records_due(at) >= records, "{records} not due at {at}");
            assert!(
                at == 0 || s.records_due(at - 1) < records,
                "{records} due before {at}"
            );
        }
        // The scheduled time of the whole run: 5.5 s for what the first three
        // steps hold (50,000 + 6,000,000 + 11) and 50,000 more.
        assert_eq!(s.due_ns(6_050_011 + 50_000), 5_500_000_000);
        assert_eq!(s.per_s_at(999_999_999), 50_000);
        assert_eq!(s.per_s_at(1_000_000_000), 3_000_000);
    }

    #[test]
    fn per_partition_divides_every_rate() {
        let s = schedule(&[(50_000, 1000), (3, 2000), (10, 1)]);
        let part = s.per_partition(4);
        let rates: Vec<u64> = part.steps().map(|s| s.per_s).collect();
        assert_eq!(rates, vec![12_500, 1, 2]);
        assert_eq!(part.due_ns(12_500), 1_000_000_000);
    }

    #[test]
    fn a_pause_holds_no_record_and_the_next_step_starts_after_it() {
        // 1000/s for 1 s, nothing for 2 s, then 1000/s.
        let s = schedule(&[(1000, 1000), (0, 2000), (1000, 1)]);
        // Record 999 is the first step's last; record 1000 opens the third
        // step, at 3 s.
        assert_eq!(s.offset_ms(999), 999);
        assert_eq!(s.offset_ms(1000), 3000);
        assert_eq!(s.offset_ms(1500), 3500);
        assert_eq!(s.records_due(999_999_999), 999);
        assert_eq!(s.records_due(1_000_000_000), 1000);
        assert_eq!(
            s.records_due(2_999_999_999),
            1000,
            "nothing is due in the pause"
        );
        assert_eq!(s.records_due(3_001_000_000), 1001);
        assert_eq!(s.per_s_at(1_500_000_000), 0);
        // Counted as due (`records_due`), a step's k-th record is due k/rate
        // after its start, the pause's length later after a pause.
        assert_eq!(s.due_ns(1000), 1_000_000_000);
        assert_eq!(s.due_ns(1001), 3_001_000_000);
        // Offsets never go back, across the pause too.
        let offsets: Vec<u64> = (0..3000).map(|n| s.offset_ms(n)).collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        // A pause stays a pause per partition; canonical text round-trips.
        let part = s.per_partition(3);
        assert_eq!(
            part.steps().map(|s| s.per_s).collect::<Vec<_>>(),
            [333, 0, 333]
        );
        assert_eq!(s.to_string(), "1000/1s,0/2s,1000");
    }

    #[test]
    fn bad_schedules_are_refused_naming_the_step() {
        let step = |per_s, duration_ms| RateStep { per_s, duration_ms };
        assert!(RateSchedule::new(&[]).unwrap_err().contains("at least one"));
        let e = RateSchedule::new(&[step(10, 1000), step(0, 1000)]).unwrap_err();
        assert!(
            e.contains("step 2") && e.contains("rate 0") && e.contains("never"),
            "{e}"
        );
        let e = RateSchedule::new(&[step(10, 0), step(5, 1000)]).unwrap_err();
        assert!(e.contains("step 1") && e.contains("0 ms"), "{e}");
        // The last step may have no duration: it holds until the end.
        assert!(RateSchedule::new(&[step(10, 1000), step(5, 0)]).is_ok());
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(RateSchedule::constant(200_000).to_string(), "200000");
        let s = schedule(&[(50_000, 1000), (3_000_000, 1500), (50_000, 2000)]);
        assert_eq!(s.to_string(), "50000/1s,3000000/1500ms,50000");
    }
}

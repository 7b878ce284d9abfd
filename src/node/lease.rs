//! Leases, the arithmetic alone (no clock of its own, no I/O): a node runs
//! its jobs only while it holds one (see the node's module header for why
//! this fences a moved job's old run).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a lease runs.
pub const LEASE: Duration = Duration::from_millis(500);
/// How often a follower asks the leader for its lease.
pub const ASK_EVERY: Duration = Duration::from_millis(100);
/// Requests remembered until their grant comes.
const ASKED_MAX: usize = 32;

/// Numbered messages sent every [`ASK_EVERY`], the last [`ASKED_MAX`]
/// remembered with their send time: a follower's lease requests and the
/// leader's probes, each answered by number.
#[derive(Debug, Default)]
struct Numbered {
    sent: VecDeque<(u64, Instant)>,
    seq: u64,
    last: Option<Instant>,
}

impl Numbered {
    /// The number of one to send now, if one is due.
    fn next(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < ASK_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        self.seq += 1;
        self.sent.push_back((self.seq, now));
        if self.sent.len() > ASKED_MAX {
            self.sent.pop_front();
        }
        Some(self.seq)
    }

    /// When number `seq` was sent, if it is remembered.
    fn sent_at(&self, seq: u64) -> Option<Instant> {
        self.sent.iter().find(|(s, _)| *s == seq).map(|(_, at)| *at)
    }

    /// Forget what was sent (numbers go on: an answer to an old one never
    /// matches a new one).
    fn forget(&mut self) {
        self.sent.clear();
        self.last = None;
    }
}

/// A follower's lease: the requests it sent, and what the grants gave.
#[derive(Debug, Default)]
pub struct FollowerLease {
    asked: Numbered,
    until: Option<Instant>,
    /// The highest commit index a counted grant named.
    commit: u64,
}

impl FollowerLease {
    /// The number of a request to send now, if one is due.
    pub fn ask(&mut self, now: Instant) -> Option<u64> {
        self.asked.next(now)
    }

    /// A grant of request `seq` from the leader: `valid` from when the
    /// request was sent (never more than [`LEASE`]), once this node has
    /// applied the log up to `commit`. A grant of a request it does not
    /// remember gives nothing.
    pub fn on_grant(&mut self, seq: u64, valid: Duration, commit: u64) {
        let Some(sent) = self.asked.sent_at(seq) else {
            return;
        };
        let until = sent + valid.min(LEASE);
        if self.until.is_none_or(|u| u < until) {
            self.until = Some(until);
        }
        self.commit = self.commit.max(commit);
    }

    /// Whether the lease holds at `now` for a node that applied the log up
    /// to `applied`.
    pub fn holds(&self, now: Instant, applied: u64) -> bool {
        self.until.is_some_and(|until| until > now) && applied >= self.commit
    }
}

/// What the leader knows of its voters' acknowledgments. Every
/// [`ASK_EVERY`] it sends each voter a numbered probe; a voter that still
/// follows it echoes the number. The voter counts as heard at the probe's
/// *send* time: an echo that arrives late (sent again after a reconnect)
/// never makes the leader's lease look fresher than it is, which counting
/// any message's arrival would.
#[derive(Debug, Default)]
pub struct LeaderAcks {
    probes: Numbered,
    acked: HashMap<u64, Instant>,
}

impl LeaderAcks {
    /// The number of a probe to send now, if one is due.
    pub fn probe(&mut self, now: Instant) -> Option<u64> {
        self.probes.next(now)
    }

    /// `voter` echoed probe `seq`: heard as of the probe's send time. An
    /// echo of a probe not remembered counts for nothing.
    pub fn on_echo(&mut self, voter: u64, seq: u64) {
        let Some(sent) = self.probes.sent_at(seq) else {
            return;
        };
        self.assume(voter, sent);
    }

    /// `voter` counts as heard at `at` (a voter just added: it was caught
    /// up a moment ago), unless heard later already.
    pub fn assume(&mut self, voter: u64, at: Instant) {
        let known = self.acked.entry(voter).or_insert(at);
        *known = (*known).max(at);
    }

    /// When `voter` last acknowledged this leader, as of its probe's send.
    pub fn acked(&self, voter: u64) -> Option<Instant> {
        self.acked.get(&voter).copied()
    }

    /// No longer the leader: what was acknowledged is void.
    pub fn reset(&mut self) {
        self.probes.forget();
        self.acked.clear();
    }
}

/// The leader's own lease: [`LEASE`] past the time it last heard from a
/// majority of `voters`, itself (`me`, heard `now`) included (`heard`:
/// [`LeaderAcks::acked`]). None when fewer than a majority were ever heard.
pub fn leader_until(
    me: u64,
    voters: &[u64],
    heard: impl Fn(u64) -> Option<Instant>,
    now: Instant,
) -> Option<Instant> {
    let mut times: Vec<Instant> = voters
        .iter()
        .filter_map(|v| if *v == me { Some(now) } else { heard(*v) })
        .collect();
    let quorum = voters.len() / 2 + 1;
    if times.len() < quorum {
        return None;
    }
    times.sort_unstable_by(|a, b| b.cmp(a));
    Some(times[quorum - 1] + LEASE)
}

/// What the leader grants at `now`, holding its own lease until
/// `leader_until`: what is left of it, at most [`LEASE`]; nothing once it
/// ended.
pub fn grant(leader_until: Instant, now: Instant) -> Option<Duration> {
    let left = leader_until.saturating_duration_since(now).min(LEASE);
    (!left.is_zero()).then_some(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_grant_counts_from_the_request_and_never_past_the_lease() {
        let t0 = Instant::now();
        let mut lease = FollowerLease::default();
        let seq = lease.ask(t0).unwrap();
        // Not due again before ASK_EVERY.
        assert_eq!(lease.ask(t0 + ms(50)), None);
        assert!(!lease.holds(t0, 0));
        // The grant arrives 200 ms later: it still counts from t0.
        lease.on_grant(seq, ms(10_000), 0);
        assert!(lease.holds(t0 + ms(499), 0));
        assert!(!lease.holds(t0 + ms(500), 0));
        // A shorter grant (what was left of the leader's) counts as given.
        let seq = lease.ask(t0 + ms(600)).unwrap();
        lease.on_grant(seq, ms(100), 0);
        assert!(lease.holds(t0 + ms(699), 0));
        assert!(!lease.holds(t0 + ms(700), 0));
        // A grant of a request never sent gives nothing.
        lease.on_grant(seq + 7, ms(500), 0);
        assert!(!lease.holds(t0 + ms(701), 0));
    }

    #[test]
    fn a_grant_counts_only_once_the_log_is_applied_as_far_as_it_names() {
        let t0 = Instant::now();
        let mut lease = FollowerLease::default();
        let seq = lease.ask(t0).unwrap();
        lease.on_grant(seq, LEASE, 42);
        assert!(!lease.holds(t0 + ms(10), 41));
        assert!(lease.holds(t0 + ms(10), 42));
        // A later grant naming less does not lower the bar.
        let seq = lease.ask(t0 + ms(100)).unwrap();
        lease.on_grant(seq, LEASE, 7);
        assert!(!lease.holds(t0 + ms(110), 41));
    }

    #[test]
    fn an_old_request_is_forgotten() {
        let t0 = Instant::now();
        let mut lease = FollowerLease::default();
        let first = lease.ask(t0).unwrap();
        for i in 1..=ASKED_MAX as u64 {
            lease.ask(t0 + ASK_EVERY * i as u32).unwrap();
        }
        lease.on_grant(first, LEASE, 0);
        assert!(!lease.holds(t0 + ms(1), 0));
    }

    #[test]
    fn the_leaders_lease_follows_the_majority_it_heard() {
        let t0 = Instant::now();
        let now = t0 + ms(1000);
        let heard = |v: u64| match v {
            2 => Some(t0 + ms(900)),
            3 => Some(t0 + ms(300)),
            _ => None,
        };
        // Three voters: itself (now) and node 2 (900) are a majority.
        assert_eq!(leader_until(1, &[1, 2, 3], heard, now), Some(t0 + ms(1400)));
        // Five: the third most recent counts (node 3 at 300).
        assert_eq!(
            leader_until(1, &[1, 2, 3, 4, 5], heard, now),
            Some(t0 + ms(800))
        );
        // Five with only two ever heard: no lease.
        let two = |v: u64| (v == 2).then_some(t0);
        assert_eq!(leader_until(1, &[1, 2, 3, 4, 5], two, now), None);
        // Alone, it holds its own.
        assert_eq!(leader_until(1, &[1], |_| None, now), Some(now + LEASE));
    }

    #[test]
    fn a_grant_is_what_is_left_of_the_leaders_lease() {
        let t0 = Instant::now();
        assert_eq!(grant(t0 + ms(800), t0), Some(LEASE));
        assert_eq!(grant(t0 + ms(120), t0), Some(ms(120)));
        assert_eq!(grant(t0, t0), None);
        assert_eq!(grant(t0, t0 + ms(5)), None);
    }

    /// An echo counts as of its probe's send time: a late one (of an older
    /// probe) never moves a voter's time forward, and an unknown or
    /// forgotten probe counts for nothing.
    #[test]
    fn an_echo_counts_from_its_probe_and_a_late_one_adds_nothing() {
        let t0 = Instant::now();
        let mut acks = LeaderAcks::default();
        let first = acks.probe(t0).unwrap();
        assert_eq!(acks.probe(t0 + ms(50)), None);
        let second = acks.probe(t0 + ms(100)).unwrap();
        acks.on_echo(7, second);
        assert_eq!(acks.acked(7), Some(t0 + ms(100)));
        // The first probe's echo, sent again after a reconnect, arrives
        // now: it says nothing newer.
        acks.on_echo(7, first);
        assert_eq!(acks.acked(7), Some(t0 + ms(100)));
        acks.on_echo(8, 999);
        assert_eq!(acks.acked(8), None);
        // Probes are remembered up to ASKED_MAX.
        for i in 2..2 + ASKED_MAX as u64 {
            acks.probe(t0 + ms(100 * i)).unwrap();
        }
        acks.on_echo(9, first);
        assert_eq!(acks.acked(9), None);
        // The leader's lease of voters {1, 7, 9}, itself 1: a majority is
        // itself and 7, as of 7's echo.
        let now = t0 + ms(300);
        assert_eq!(
            leader_until(1, &[1, 7, 9], |v| acks.acked(v), now),
            Some(t0 + ms(100) + LEASE)
        );
        acks.reset();
        assert_eq!(leader_until(1, &[1, 7, 9], |v| acks.acked(v), now), None);
    }
}

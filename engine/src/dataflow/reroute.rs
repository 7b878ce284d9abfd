//! Elastic keyed stages: a stage's key groups change owner among its
//! partitions while the job runs (a range split in two, two ranges merged,
//! any table), with per-key order and exactly-once state.
//!
//! A keyed stage starts with contiguous ranges (`partition_of_group`). A
//! reroute orders a new table, version `v`, of the owner of every group
//! (`Registry::reroute`, `Dataflow::reroute`); one reroute of a job is under
//! way at a time.
//!
//! 1. Every partition of every stage that feeds the stage gets
//!    `DataMsg::Reroute`. Between two of its handlers it switches: what it
//!    sends from then on is routed by the new table, and it says so with a
//!    `Rerouted` marker on each of its channels to the stage, after
//!    everything it routed by the old one (channels are FIFO, also while
//!    actors move).
//! 2. A partition that gives groups up holds what comes after each marker
//!    until it has the marker of every channel (or its end): then it has
//!    handled every record the old table sent it, and its watermark is the
//!    least of the channels' watermarks at their markers, so it fired no
//!    window that a record sent after a marker belongs to. It finishes any
//!    fire under way, takes each group it gives up out of its state as it
//!    is held (`Stateful::take_group`: no encoding within a process; a
//!    handoff to a partition on another node crosses encoded, see
//!    `wire`), leaving it empty, says `Handed` on its output
//!    channels, and sends one `Handoff` to each new owner (also when the
//!    groups are empty: the owner waits for it). A handoff takes no credit
//!    (`Context::send_uncredited`): two partitions of a stage may each be
//!    blocked on the other's full mailbox.
//! 3. A partition that takes groups holds what comes after each marker
//!    until every handoff it expects came; then it puts the groups in
//!    (`Stateful::put_group`),
//!    says `After` on its output channels, and handles what it held, in
//!    order. A partition that also gives takes nothing before it gave, so
//!    on every channel a partition's `Handed` comes before its `After`:
//!    a consumer's waits (below) never form a cycle. What comes before a marker is routed by the old table and
//!    holds none of its new groups, so it is handled at once; its
//!    watermark is then no later than the giver's, so nothing in the groups
//!    it takes is overdue.
//! 4. A partition has completed `v` once every channel has sent its marker
//!    or ended, it has given and it has taken; it tells the plan (over
//!    nodes, node 0's monitor of the job, `Plan::reroute_done`). A new
//!    reroute of the job is ordered only once every partition of every
//!    stage completed the last.
//!
//! So a key's records reach the operator in order: those routed by the old
//! table at the old owner, all of them before its state leaves; then, after
//! the state arrived, those routed by the new one at the new owner. A
//! consumer of the stage keeps the key's rows in order too (`Gate` in
//! `actors`): a channel that says `After` waits until the giver's `Handed`
//! came on the giver's channel, so rows the taker made from the groups it
//! took are handled after every row the giver made from them. (With a
//! forward edge to a sink of several partitions, a key's rows may move to
//! another sink partition: each output stays in order.)
//!
//! An operator keeps a key's state in the group of the key its input is
//! routed by (`Operator::state`), so the group's state is the key's. One
//! whose state holds partials a later stage merges (`keeps_partials`: a
//! two-phase aggregate's first phase not keyed by the aggregate's key)
//! gives and takes nothing: its partials fire where they are.
//!
//! Such a stage may also run in *parallel mode*: its table is empty, and a
//! feeder sends each batch whole to the partition with the least backlog
//! as its shard sees it (`Context::backlog`: the target's mailbox here, or
//! the messages sent it and not yet acknowledged). Any partition may then
//! take any key; each window's partials are merged downstream, which waits
//! for every partition's watermark, so every window stays exact. So may a
//! stage whose operator keeps no state (`Operator::state` is `None`): its
//! rows of one key then come from several partitions, in no set order
//! (per-key order holds again once it is back in ordered mode and what it
//! sent in parallel mode has been handled). Switching to parallel mode and
//! back is a reroute like any other (its markers are the epoch at which
//! each feeder switches), with nothing to hand over.
//!
//! What it costs: nothing until a stage is rerouted; then one lookup of the
//! sender's table per batch (a short vector). A partition holds what its
//! channels deliver until its markers or handoffs come, which is as long as
//! the slowest sender or giver takes to reach them (backlogs that credits
//! bound); unlike a checkpoint's alignment there is no cap to give up at,
//! since the feeders have switched already.
//!
//! In a job that takes checkpoints, reroutes and checkpoints take turns
//! (`Checkpointer::begin_reroute`): a reroute is refused while an actor may
//! align for the newest checkpoint (until every actor has reported its
//! part for it, or passed on a declined barrier; a barrier of it still in
//! a channel is then stale and ignored where it arrives), and a
//! checkpoint is not requested while a reroute is under way (until every
//! partition of the stage completed it). So a checkpoint's cut never falls
//! inside a reroute: no handoff is in flight, no partition holds anything
//! for a marker, and every group is in its owner's part; an alignment and a
//! reroute's holds never wait on each other. The tables are in each
//! actor's checkpointed bookkeeping (a feeder's routing, a partition's own
//! table), and a restored job's plan takes its tables from its partitions'
//! (`RerouteSlot::restore`), so its next reroute has a newer version.

use std::sync::{Arc, Mutex};

/// A keyed stage's reroutes: the newest table ordered, and how many of its
/// partitions have completed it. Touched at a reroute only, never per record.
#[derive(Default)]
pub(crate) struct RerouteSlot {
    state: Mutex<RerouteState>,
}

#[derive(Default)]
struct RerouteState {
    version: u64,
    owners: Option<Arc<[u32]>>,
    done: u32,
}

impl RerouteSlot {
    /// The newest version ordered, its table, and partitions done with it.
    pub(crate) fn get(&self) -> (u64, Option<Arc<[u32]>>, u32) {
        let state = self.state.lock().expect("reroute state poisoned");
        (state.version, state.owners.clone(), state.done)
    }

    /// Order `version` by `owners`.
    pub(crate) fn order(&self, version: u64, owners: Arc<[u32]>) {
        let mut state = self.state.lock().expect("reroute state poisoned");
        *state = RerouteState {
            version,
            owners: Some(owners),
            done: 0,
        };
    }

    /// A partition completed `version`: how many have now (0 if `version`
    /// is not the newest).
    pub(crate) fn completed(&self, version: u64) -> u32 {
        let mut state = self.state.lock().expect("reroute state poisoned");
        if state.version != version {
            return 0;
        }
        state.done += 1;
        state.done
    }

    /// Restored from a checkpoint: `version` by `owners`, completed by all
    /// `partitions`.
    pub(crate) fn restore(&self, version: u64, owners: Arc<[u32]>, partitions: u32) {
        *self.state.lock().expect("reroute state poisoned") = RerouteState {
            version,
            owners: Some(owners),
            done: partitions,
        };
    }
}

/// `owners` with the upper half of `from`'s groups (by group number) given
/// to `to`: a range split in two. `None` if `from` owns fewer than two
/// groups or `from == to`.
pub fn split(owners: &[u32], from: u32, to: u32) -> Option<Vec<u32>> {
    let held: Vec<usize> = (0..owners.len()).filter(|&g| owners[g] == from).collect();
    if held.len() < 2 || from == to {
        return None;
    }
    let mut table = owners.to_vec();
    for &g in &held[held.len() / 2..] {
        table[g] = to;
    }
    Some(table)
}

/// `owners` with every group of `from` given to `into`: two ranges merged.
/// `None` if `from` owns none or `from == into`.
pub fn merge(owners: &[u32], from: u32, into: u32) -> Option<Vec<u32>> {
    if from == into || !owners.contains(&from) {
        return None;
    }
    Some(
        owners
            .iter()
            .map(|&p| if p == from { into } else { p })
            .collect(),
    )
}

/// A random change of `stage`'s table `owners`, as tests make them: one
/// range split, two merged, or every group to a random owner; for a stage
/// that keeps partials, also a switch to parallel mode (an empty table) and
/// back (`None` when the pick changes nothing).
pub fn random_change(
    rng: &mut crate::runtime::sim::SimRng,
    owners: &[u32],
    stage: super::KeyedStage,
    groups: u32,
) -> Option<Vec<u32>> {
    let parallelism = stage.parallelism;
    if stage.parallelizable && rng.below(3) == 0 {
        return Some(match owners.is_empty() {
            true => (0..groups)
                .map(|_| rng.below(parallelism as u64) as u32)
                .collect(),
            false => Vec::new(),
        });
    }
    if owners.is_empty() {
        return None;
    }
    let kind = rng.below(3);
    let mut pick = || rng.below(parallelism as u64) as u32;
    match kind {
        0 => split(owners, pick(), pick()),
        1 => merge(owners, pick(), pick()),
        _ => Some(owners.iter().map(|_| pick()).collect()),
    }
}

/// Groups each of `parallelism` partitions owns by `owners`.
pub fn groups_per_partition(owners: &[u32], parallelism: u32) -> Vec<u32> {
    let mut counts = vec![0u32; parallelism as usize];
    for &p in owners {
        if let Some(count) = counts.get_mut(p as usize) {
            *count += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_gives_the_upper_half_and_a_merge_takes_all() {
        let owners = vec![0, 0, 0, 0, 1, 1, 1, 1];
        assert_eq!(split(&owners, 0, 2), Some(vec![0, 0, 2, 2, 1, 1, 1, 1]));
        assert_eq!(split(&owners, 1, 1), None);
        assert_eq!(split(&[0, 1], 0, 1), None, "one group does not split");
        assert_eq!(merge(&owners, 1, 0), Some(vec![0; 8]));
        assert_eq!(merge(&owners, 3, 0), None, "partition 3 owns nothing");
        assert_eq!(groups_per_partition(&owners, 3), vec![4, 4, 0]);
    }
}

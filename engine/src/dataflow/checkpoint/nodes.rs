//! Checkpoints of a dataflow that spans nodes.
//!
//! Node 0's checkpointer is the coordinator (`Role::Coordinator`): it runs
//! the protocol of the module above for the whole job. Another node's is a
//! participant (`Role::Participant`), which restores its actors from the
//! same committed manifest and otherwise only forwards:
//!
//! - When the coordinator requests epoch `n`, it tells every other node's
//!   monitor of the job (`DataMsg::CheckpointRequest`), which sets its
//!   checkpointer's `requested`: sources there inject barrier `n` as they
//!   would on node 0.
//! - A participant takes its actors' parts in the order they came and, once
//!   each is ready (its shard's chunk write reported, its sealed output
//!   made durable, both on the participant's own thread), sends it to node
//!   0's monitor (`DataMsg::CheckpointPart`): its groups as where they were
//!   written, or as bytes (a final part's, a failed write's) that the
//!   coordinator writes at commit; its sealed output as the staged files.
//!   A part whose bytes pass `PIECE_BYTES` crosses in pieces.
//! - The coordinator takes every actor's parts in the actor's order
//!   (`Part::seq`, counted by the actor and carried with it when it moves):
//!   a part sent from node 1 before its actor moved to node 0 may arrive
//!   after the actor's next part, made on node 0.
//! - When the final checkpoint commits, or the job fails at the
//!   coordinator, it tells the other nodes' monitors
//!   (`DataMsg::CheckpointOver`): their handles of the job end with it. A
//!   participant that cannot make its sealed output durable fails the job
//!   and tells the coordinator.
//!
//! Chunk and staged files are written into the job's data directory by
//! whichever node holds the actor: every node must reach the same directory
//! (one machine's file system, or a shared one).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Checkpointer, EncodedGroups, GroupRef, Groups, Part, PartKind, Role, Sealed, SealedFile,
    StagedEntry, WriteOutcome, Written,
};
use crate::dataflow::DataMsg;
use crate::ids::ActorId;

/// Bytes of encoded groups one `CheckpointPart` message carries at most
/// (a part with more crosses in pieces; a message crosses nodes up to
/// `runtime::remote::HANDOFF_BYTES_MAX`).
pub(crate) const PIECE_BYTES: usize = 4 << 20;

/// Sends a message to an actor of the run (`Runtime::send`, from the
/// checkpointer's thread).
pub(crate) type Post = Arc<dyn Fn(ActorId, DataMsg) + Send + Sync>;

/// How a checkpointer reaches its job's monitors.
pub(crate) struct Link {
    pub post: Post,
    /// The job's monitor on each node, node 0's first.
    pub monitors: Vec<ActorId>,
}

/// An actor's part as it crosses from another node to the coordinator:
/// its groups where its shard wrote them (`at`) or as bytes (`encoded`),
/// its sealed output as durable staged files. One of several pieces
/// unless `last`: the others carry only bytes of groups.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
#[doc(hidden)]
pub struct RemotePart {
    stage: u32,
    partition: u32,
    seq: u64,
    epoch: u64,
    /// 0 regular, 1 final, 2 declined (`reason`), 3 passed.
    kind: u8,
    reason: String,
    meta: Vec<u8>,
    at: Option<Vec<(u32, Option<GroupRef>)>>,
    encoded: Vec<(u32, Vec<u8>)>,
    /// `(output, staged file, a write of it that was tried again)`.
    sealed: Vec<(String, StagedEntry, Option<String>)>,
    alignment_ns: Option<u64>,
    last: bool,
    /// The checkpoint the sending node resumed from (0: none).
    restored: u64,
}

/// Parts the coordinator holds until each actor's earlier ones came.
#[derive(Default)]
pub(crate) struct InOrder {
    /// Per actor, the number of the part it takes next (1 at first).
    next: BTreeMap<(u32, u32), u64>,
    early: BTreeMap<((u32, u32), u64), Part>,
}

/// Groups of parts that cross in pieces, by actor and part, until the last.
pub(crate) type Pieces = BTreeMap<((u32, u32), u64), EncodedGroups>;

impl Checkpointer {
    /// Over nodes, from the moment the runtime runs: how to reach the
    /// job's monitors (`monitors[0]` is node 0's). The coordinator requests
    /// no checkpoint before.
    pub(crate) fn connect(&self, post: Post, monitors: Vec<ActorId>) {
        let _ = self.link.set(Link { post, monitors });
        self.wake.notify_one();
    }

    /// Whether the thread may request a checkpoint: one node's always; the
    /// coordinator once it can tell the others (`await_start`).
    pub(super) fn may_request(&self) -> bool {
        self.role != Role::Coordinator || self.link.get().is_some()
    }

    /// Node 0 started the job (`Dataflow::start_job`): every node has
    /// registered it, so its monitors there may be told.
    pub(crate) fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// The coordinator's thread, before it runs: wait until the job was
    /// started and the monitors can be reached (a monitor asked for before
    /// its node registered the job would fail, and take every later notice
    /// with it; and a restored job whose every actor had ended commits its
    /// final checkpoint at once, which the others must hear of). False if
    /// stopped or failed first.
    pub(super) fn await_start(&self) -> bool {
        let mut inbox = self.inbox.lock().expect("checkpointer poisoned");
        loop {
            if inbox.stop || self.failure().is_some() {
                return false;
            }
            if self.started.load(Ordering::Acquire) && self.link.get().is_some() {
                return true;
            }
            inbox = self
                .wake
                .wait_timeout(inbox, Duration::from_millis(20))
                .expect("checkpointer poisoned")
                .0;
        }
    }

    /// The coordinator requested `epoch`: tell the other nodes, with the
    /// checkpoint it restored (each checks it restored the same).
    pub(super) fn tell_requested(&self, epoch: u64) {
        let restored = self.restored_epoch();
        self.tell_others(|| DataMsg::CheckpointRequest { epoch, restored });
    }

    /// The final checkpoint committed: tell the other nodes, before it shows
    /// here (see `error`).
    pub(super) fn tell_finished(&self) {
        self.tell_others(|| DataMsg::CheckpointOver { error: None });
        self.told.store(true, Ordering::Release);
    }

    /// The coordinator's thread ended: if the job failed, tell the other
    /// nodes, then let the failure show (a stop tells nothing).
    pub(super) fn tell_over(&self) {
        if self.told.load(Ordering::Acquire) {
            return;
        }
        if let Some(error) = self.failure() {
            self.tell_others(|| DataMsg::CheckpointOver {
                error: Some(error.clone()),
            });
            self.told.store(true, Ordering::Release);
        }
    }

    fn tell_others(&self, message: impl Fn() -> DataMsg) {
        if self.role != Role::Coordinator {
            return;
        }
        if let Some(link) = self.link.get() {
            for &monitor in link.monitors.iter().skip(1) {
                (link.post)(monitor, message());
            }
        }
    }

    /// The epoch this checkpointer restored (0: none).
    fn restored_epoch(&self) -> u64 {
        self.stats
            .lock()
            .expect("checkpointer poisoned")
            .restored_epoch
            .unwrap_or(0)
    }

    /// A participant's monitor heard that `epoch` was requested by node 0,
    /// which restored checkpoint `restored` (0: none): this node must have
    /// restored the same, or its nodes read different directories.
    pub(crate) fn note_requested(&self, epoch: u64, restored: u64) {
        let here = self.restored_epoch();
        if restored != here {
            self.fail_job(format!(
                "node 0 resumed {} from checkpoint {restored} and this node from {here}: \
                 every node must reach the same data directory",
                self.shape.job
            ));
            self.wake.notify_one();
            return;
        }
        self.requested.fetch_max(epoch, Ordering::AcqRel);
    }

    /// A monitor heard that the job's checkpoints are over: the final one
    /// committed (`None`), or the job failed on another node. Node 0 tells
    /// the other nodes in turn (`tell_over`, once its thread sees it); a
    /// participant told by node 0 tells no one.
    pub(crate) fn note_over(&self, error: Option<String>) {
        match error {
            Some(error) => {
                self.fail_job(error);
                if self.role == Role::Participant {
                    self.told.store(true, Ordering::Release);
                }
                self.wake.notify_one();
            }
            None => self.finished.store(true, Ordering::Release),
        }
    }

    /// The coordinator's shard wrote a part's groups: if the part is held
    /// for an earlier one of its actor, it takes where they went (or their
    /// bytes, to write at the commit) now; else the report goes on.
    pub(super) fn written_for_held(&self, written: Written) -> Option<Written> {
        let mut order = self.in_order.lock().expect("checkpointer poisoned");
        let held = order.early.values_mut().find(|p| {
            p.actor == written.actor
                && p.epoch == written.epoch
                && matches!(p.groups, Groups::Writing)
        });
        let Some(part) = held else {
            return Some(written);
        };
        part.groups = match written.result {
            Ok(at) => Groups::At(at),
            Err((error, bytes)) => {
                eprintln!(
                    "warning: {}: a chunk write failed, its groups are written at the commit: \
                     {error}",
                    self.shape.job
                );
                Groups::Encoded(bytes)
            }
        };
        None
    }

    /// The coordinator's monitor took a part (or a piece of one) from
    /// another node.
    pub(crate) fn report_remote(&self, remote: RemotePart) {
        let key = ((remote.stage, remote.partition), remote.seq);
        let here = self.restored_epoch();
        if remote.restored != here {
            // Also where no request is sent: a restored run whose sources
            // had all ended commits its final checkpoint at once.
            self.fail_job(format!(
                "node 0 resumed {} from checkpoint {here} and another node from {}: every \
                 node must reach the same data directory",
                self.shape.job, remote.restored
            ));
            self.wake.notify_one();
            return;
        }
        let encoded = {
            let mut pieces = self.pieces.lock().expect("checkpointer poisoned");
            let held = pieces.entry(key).or_default();
            // A group too large for one piece goes on in the next.
            for (group, bytes) in remote.encoded {
                match held.last_mut() {
                    Some((last, more)) if *last == group => more.extend_from_slice(&bytes),
                    _ => held.push((group, bytes)),
                }
            }
            if !remote.last {
                return;
            }
            pieces.remove(&key).unwrap_or_default()
        };
        self.stats
            .lock()
            .expect("checkpointer poisoned")
            .parts_from_nodes += 1;
        let groups = match remote.at {
            Some(at) => Groups::At(
                at.into_iter()
                    .map(|(group, at)| (group, at.map(|r| r.part())))
                    .collect(),
            ),
            None => Groups::Encoded(encoded),
        };
        let sealed = remote
            .sealed
            .into_iter()
            .map(|(output, staged, retried)| Sealed {
                output: PathBuf::from(output),
                // Durable already: the participant finished it.
                finish: Box::new(move || {
                    Ok(SealedFile {
                        staged: staged.staged(),
                        retried,
                    })
                }),
            })
            .collect();
        let kind = match remote.kind {
            0 => PartKind::Regular,
            1 => PartKind::Final,
            2 => PartKind::Declined(remote.reason),
            _ => PartKind::Passed,
        };
        self.admit_in_order(Part {
            actor: key.0,
            seq: remote.seq,
            epoch: remote.epoch,
            kind,
            meta: remote.meta,
            groups,
            sealed,
            alignment_ns: remote.alignment_ns,
        });
    }

    /// Into the thread's inbox in each actor's order: a part that comes
    /// before an earlier one of its actor waits for it.
    pub(super) fn admit_in_order(&self, part: Part) {
        let mut order = self.in_order.lock().expect("checkpointer poisoned");
        let actor = part.actor;
        let next = order.next.get(&actor).copied().unwrap_or(1);
        if part.seq != next {
            order.early.insert((actor, part.seq), part);
            self.stats.lock().expect("checkpointer poisoned").parts_held += 1;
            return;
        }
        let mut ready = vec![part];
        let mut next = next + 1;
        while let Some(part) = order.early.remove(&(actor, next)) {
            ready.push(part);
            next += 1;
        }
        order.next.insert(actor, next);
        // Under the order's lock: another thread's later part of this
        // actor cannot get into the inbox first.
        self.take_parts(ready);
    }

    /// A participant's thread: each part, once ready, to the coordinator.
    pub(super) fn forward(&self) {
        let mut queue: VecDeque<Part> = VecDeque::new();
        let mut written: BTreeMap<((u32, u32), u64), WriteOutcome> = BTreeMap::new();
        let mut looked = std::time::Instant::now();
        let mut newest_seen = 0;
        loop {
            // Should node 0's word of the end be lost (it is sent, not
            // acknowledged), the final manifest in the directory says it.
            if !self.finished() && looked.elapsed() >= Duration::from_millis(200) {
                looked = std::time::Instant::now();
                self.look_for_the_end(&mut newest_seen);
            }
            {
                let mut inbox = self.inbox.lock().expect("checkpointer poisoned");
                if inbox.parts.is_empty() && inbox.written.is_empty() && !inbox.stop {
                    inbox = self
                        .wake
                        .wait_timeout(inbox, Duration::from_millis(20))
                        .expect("checkpointer poisoned")
                        .0;
                }
                if inbox.stop {
                    return;
                }
                queue.extend(inbox.parts.drain(..));
                for done in inbox.written.drain(..) {
                    written.insert((done.actor, done.epoch), done.result);
                }
            }
            let Some(link) = self.link.get() else {
                continue;
            };
            while let Some(head) = queue.front_mut() {
                if matches!(head.groups, Groups::Writing) {
                    match written.remove(&(head.actor, head.epoch)) {
                        Some(Ok(at)) => head.groups = Groups::At(at),
                        // The coordinator writes them at its commit.
                        Some(Err((error, bytes))) => {
                            eprintln!(
                                "warning: {}: a chunk write failed, its groups go to node 0 \
                                 as bytes: {error}",
                                self.shape.job
                            );
                            head.groups = Groups::Encoded(bytes);
                        }
                        None => break,
                    }
                }
                let part = queue.pop_front().expect("a head");
                match self.ready(part) {
                    Ok(pieces) => {
                        for piece in pieces {
                            (link.post)(link.monitors[0], DataMsg::CheckpointPart(Box::new(piece)));
                        }
                    }
                    Err(error) => self.fail_job(error),
                }
            }
            if let Some(error) = self.failure() {
                // Not back to node 0 what came from it.
                if !self.told.load(Ordering::Acquire) {
                    (link.post)(
                        link.monitors[0],
                        DataMsg::CheckpointOver { error: Some(error) },
                    );
                    self.told.store(true, Ordering::Release);
                }
                return;
            }
        }
    }

    /// A participant reads the newest manifest it has not read yet: if it
    /// is the final one, the job's checkpoints are over.
    fn look_for_the_end(&self, newest_seen: &mut u64) {
        let Ok(epochs) = self.store.manifest_epochs() else {
            return;
        };
        if let Some(&newest) = epochs.last().filter(|&&e| e > *newest_seen) {
            if let Ok(manifest) = super::read_manifest(&self.store, newest) {
                *newest_seen = newest;
                if manifest.finished && manifest.shape == self.shape {
                    self.finished.store(true, Ordering::Release);
                }
            }
        }
    }

    /// A part as it crosses: its sealed output made durable here, its
    /// bytes in pieces of `PIECE_BYTES` at most.
    fn ready(&self, part: Part) -> Result<Vec<RemotePart>, String> {
        let mut sealed = Vec::new();
        for s in part.sealed {
            let file = (s.finish)()
                .map_err(|e| format!("staging output for {}: {e}", s.output.display()))?;
            sealed.push((
                s.output.display().to_string(),
                StagedEntry {
                    file: file.staged.file,
                    len: file.staged.len,
                    crc: file.staged.crc,
                },
                file.retried,
            ));
        }
        let (kind, reason) = match part.kind {
            PartKind::Regular => (0, String::new()),
            PartKind::Final => (1, String::new()),
            PartKind::Declined(reason) => (2, reason),
            PartKind::Passed => (3, String::new()),
        };
        let (at, encoded) = match part.groups {
            Groups::At(at) => (
                Some(
                    at.into_iter()
                        .map(|(group, at)| {
                            let at = at.map(|r| GroupRef {
                                group,
                                file: r.file,
                                offset: r.offset,
                                len: r.len,
                                crc: r.crc,
                            });
                            (group, at)
                        })
                        .collect(),
                ),
                Vec::new(),
            ),
            Groups::Encoded(encoded) => (None, encoded),
            Groups::Writing => unreachable!("a part is sent once its write reported"),
        };
        let (stage, partition) = part.actor;
        let restored = self.restored_epoch();
        let piece = |encoded| RemotePart {
            stage,
            partition,
            seq: part.seq,
            epoch: part.epoch,
            kind: 0,
            reason: String::new(),
            meta: Vec::new(),
            at: None,
            encoded,
            sealed: Vec::new(),
            alignment_ns: None,
            last: false,
            restored,
        };
        // Pieces of `PIECE_BYTES` at most: a larger group is cut, its bytes
        // going on in the next piece (taken back together in order).
        let mut pieces = Vec::new();
        let mut current: EncodedGroups = Vec::new();
        let mut bytes = 0;
        for (group, data) in encoded {
            let mut rest = &data[..];
            loop {
                if bytes == PIECE_BYTES {
                    pieces.push(piece(std::mem::take(&mut current)));
                    bytes = 0;
                }
                let take = rest.len().min(PIECE_BYTES - bytes);
                current.push((group, rest[..take].to_vec()));
                bytes += take;
                rest = &rest[take..];
                if rest.is_empty() {
                    break;
                }
            }
        }
        pieces.push(RemotePart {
            kind,
            reason,
            meta: part.meta,
            at,
            sealed,
            alignment_ns: part.alignment_ns,
            last: true,
            ..piece(current)
        });
        Ok(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(seq: u64, groups: Groups) -> Part {
        Part {
            actor: (1, 2),
            seq,
            epoch: 7,
            kind: PartKind::Final,
            meta: vec![1, 2, 3],
            groups,
            sealed: Vec::new(),
            alignment_ns: Some(5),
        }
    }

    fn checkpointer(dir: &std::path::Path, role: Role) -> Checkpointer {
        let options = super::super::CheckpointOptions::new(dir, Duration::from_secs(60));
        Checkpointer::open(options, "job", vec![("s".into(), 3)], 8, role).expect("opens")
    }

    #[test]
    fn a_large_part_crosses_in_pieces_and_is_taken_whole() {
        let dir = std::env::temp_dir().join(format!("dirigo-nodes-pieces-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let participant = checkpointer(&dir, Role::Participant);
        let groups: EncodedGroups = (0..5).map(|g| (g, vec![g as u8; 3 << 20])).collect();
        let pieces = participant
            .ready(part(1, Groups::Encoded(groups.clone())))
            .expect("ready");
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        assert!(pieces
            .iter()
            .rev()
            .skip(1)
            .all(|p| !p.last && p.meta.is_empty()));
        let coordinator = checkpointer(&dir, Role::Coordinator);
        for piece in pieces {
            coordinator.report_remote(piece);
        }
        let taken = std::mem::take(&mut coordinator.inbox.lock().unwrap().parts);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].meta, vec![1, 2, 3]);
        assert!(matches!(taken[0].kind, PartKind::Final));
        match &taken[0].groups {
            Groups::Encoded(got) => assert_eq!(got, &groups),
            _ => panic!("groups as bytes"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_group_larger_than_a_piece_is_cut_and_taken_back_whole() {
        let dir = std::env::temp_dir().join(format!("dirigo-nodes-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let participant = checkpointer(&dir, Role::Participant);
        let big: Vec<u8> = (0..(PIECE_BYTES * 5 / 2))
            .map(|i| (i % 251) as u8)
            .collect();
        let groups: EncodedGroups = vec![(3, vec![1; 10]), (4, big), (5, Vec::new())];
        let pieces = participant
            .ready(part(1, Groups::Encoded(groups.clone())))
            .expect("ready");
        assert_eq!(pieces.len(), 3);
        for piece in &pieces {
            let bytes: usize = piece.encoded.iter().map(|(_, b)| b.len()).sum();
            assert!(bytes <= PIECE_BYTES, "a piece of {bytes} bytes");
        }
        let coordinator = checkpointer(&dir, Role::Coordinator);
        for piece in pieces {
            coordinator.report_remote(piece);
        }
        let taken = std::mem::take(&mut coordinator.inbox.lock().unwrap().parts);
        match &taken[0].groups {
            Groups::Encoded(got) => assert_eq!(got, &groups),
            _ => panic!("groups as bytes"),
        }
        assert_eq!(coordinator.stats().parts_from_nodes, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A part held for an earlier one of its actor takes its chunk write's
    /// report while held: once taken it waits for nothing.
    #[test]
    fn a_held_part_takes_its_write_report() {
        let dir = std::env::temp_dir().join(format!("dirigo-nodes-held-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let coordinator = checkpointer(&dir, Role::Coordinator);
        coordinator.admit_in_order(part(2, Groups::Writing));
        coordinator.report_written(Written {
            actor: (1, 2),
            epoch: 7,
            result: Ok(vec![(4, None)]),
        });
        assert!(coordinator.inbox.lock().unwrap().written.is_empty());
        coordinator.admit_in_order(part(1, Groups::none()));
        let inbox = coordinator.inbox.lock().unwrap();
        assert_eq!(inbox.parts.len(), 2);
        assert!(matches!(&inbox.parts[1].groups, Groups::At(at) if at == &vec![(4, None)]));
        assert_eq!(coordinator.stats().parts_held, 1);
        drop(inbox);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A node that resumed from another checkpoint than node 0 fails the
    /// job, and says so at once (it was told by node 0); node 0, told of a
    /// failure by another node, shows it only once it has told the others.
    #[test]
    fn a_failure_shows_once_the_other_nodes_are_told() {
        let dir = std::env::temp_dir().join(format!("dirigo-nodes-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let participant = checkpointer(&dir, Role::Participant);
        participant.note_requested(3, 0);
        assert_eq!(participant.requested(), 3);
        participant.note_requested(4, 2);
        assert_eq!(participant.requested(), 3, "no barrier of a mismatched run");
        assert!(participant
            .failure()
            .is_some_and(|e| e.contains("checkpoint 2")));
        // Its forward loop tells node 0, then the error shows.
        assert!(participant.error().is_none());
        participant.told.store(true, Ordering::Release);
        assert!(participant.error().is_some());

        let coordinator = checkpointer(&dir, Role::Coordinator);
        coordinator.note_over(Some("a sink on node 1 failed".into()));
        assert!(coordinator.failure().is_some());
        assert!(
            coordinator.error().is_none(),
            "not before the others are told"
        );
        coordinator.tell_over();
        assert_eq!(
            coordinator.error().as_deref(),
            Some("a sink on node 1 failed")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_coordinator_takes_an_actors_parts_in_its_order() {
        let dir = std::env::temp_dir().join(format!("dirigo-nodes-order-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let coordinator = checkpointer(&dir, Role::Coordinator);
        // Parts 3 and 2 come before 1: nothing is taken until 1 comes.
        coordinator.admit_in_order(part(3, Groups::none()));
        coordinator.admit_in_order(part(2, Groups::none()));
        assert!(coordinator.inbox.lock().unwrap().parts.is_empty());
        coordinator.admit_in_order(part(1, Groups::none()));
        let seqs: Vec<u64> = coordinator
            .inbox
            .lock()
            .unwrap()
            .parts
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

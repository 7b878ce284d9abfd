//! `DataMsg` between nodes: what a dataflow message becomes to cross
//! (`runtime::Wire`), as the gateway takes it from its shard's ring.
//!
//! Most messages cross as they are. Two hold what the runtime cannot
//! encode by itself: a record batch (its element type erased) crosses as
//! its type's name, its count and one rkyv archive of its records
//! (`Batch::encode`: the batch took its type's encoder when it was made),
//! read back by the stage that takes it (`Batch::into_vec`); a handoff's
//! key groups, held as state objects within a node, cross encoded as a
//! snapshot writes them (`MovedGroup::into_bytes`). A reroute's tables
//! cross as vectors. Messages a stage only sends itself (`Snapshot`,
//! `Replay`, `Fire`) cross too, should the stage have moved meanwhile.

use std::sync::Arc;

use rkyv::{Archive, Deserialize, Serialize};

use super::batch::Batch;
use super::checkpoint::RemotePart;
use super::state::MovedGroup;
use super::DataMsg;
use crate::runtime::Wire;

/// A record batch on the wire: its records' type, count, and their
/// archive (or why their node could not encode them: the stage that
/// takes the batch fails, naming it).
#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub struct WireRecords {
    type_name: String,
    len: u64,
    bytes: Result<Vec<u8>, String>,
}

/// `DataMsg` on the wire, variant for variant.
#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub enum WireData {
    Tick,
    Records {
        input: u8,
        from: u32,
        records: WireRecords,
    },
    Watermark {
        input: u8,
        from: u32,
        watermark_ms: i64,
    },
    Barrier {
        input: u8,
        from: u32,
        epoch: u64,
        declined: bool,
    },
    Snapshot {
        epoch: u64,
    },
    Replay,
    Fire,
    Reroute {
        stage: u32,
        version: u64,
        owners: Vec<u32>,
    },
    Rerouted {
        input: u8,
        from: u32,
        version: u64,
        owners: Vec<u32>,
    },
    Handed {
        input: u8,
        from: u32,
        version: u64,
    },
    After {
        input: u8,
        from: u32,
        giver: u32,
        version: u64,
    },
    Handoff {
        from: u32,
        version: u64,
        owners: Vec<u32>,
        groups: Vec<(u32, Option<Vec<u8>>)>,
    },
    SinkDone,
    RerouteDone {
        stage: u32,
        version: u64,
    },
    JobFailed {
        error: String,
    },
    CheckpointPart(RemotePart),
    CheckpointRequest {
        epoch: u64,
        restored: u64,
    },
    CheckpointOver {
        error: Option<String>,
    },
    NodeLoads {
        first: u16,
        loads: Vec<u16>,
    },
}

impl Wire for DataMsg {
    type Repr = WireData;

    fn into_wire(self) -> WireData {
        match self {
            DataMsg::Tick => WireData::Tick,
            DataMsg::Records { input, from, batch } => {
                let (type_name, len, bytes) = batch.encode();
                WireData::Records {
                    input,
                    from,
                    records: WireRecords {
                        type_name,
                        len: len as u64,
                        bytes,
                    },
                }
            }
            DataMsg::Watermark {
                input,
                from,
                watermark_ms,
            } => WireData::Watermark {
                input,
                from,
                watermark_ms,
            },
            DataMsg::Barrier {
                input,
                from,
                epoch,
                declined,
            } => WireData::Barrier {
                input,
                from,
                epoch,
                declined,
            },
            DataMsg::Snapshot { epoch } => WireData::Snapshot { epoch },
            DataMsg::Replay => WireData::Replay,
            DataMsg::Fire => WireData::Fire,
            DataMsg::Reroute {
                stage,
                version,
                owners,
            } => WireData::Reroute {
                stage,
                version,
                owners: owners.to_vec(),
            },
            DataMsg::Rerouted {
                input,
                from,
                version,
                owners,
            } => WireData::Rerouted {
                input,
                from,
                version,
                owners: owners.to_vec(),
            },
            DataMsg::Handed {
                input,
                from,
                version,
            } => WireData::Handed {
                input,
                from,
                version,
            },
            DataMsg::After {
                input,
                from,
                giver,
                version,
            } => WireData::After {
                input,
                from,
                giver,
                version,
            },
            DataMsg::Handoff {
                from,
                version,
                owners,
                groups,
            } => WireData::Handoff {
                from,
                version,
                owners: owners.to_vec(),
                groups: groups
                    .into_iter()
                    .map(|(group, moved)| (group, moved.map(MovedGroup::into_bytes)))
                    .collect(),
            },
            DataMsg::SinkDone => WireData::SinkDone,
            DataMsg::RerouteDone { stage, version } => WireData::RerouteDone { stage, version },
            DataMsg::JobFailed { error } => WireData::JobFailed { error },
            DataMsg::CheckpointPart(part) => WireData::CheckpointPart(*part),
            DataMsg::CheckpointRequest { epoch, restored } => {
                WireData::CheckpointRequest { epoch, restored }
            }
            DataMsg::CheckpointOver { error } => WireData::CheckpointOver { error },
            DataMsg::NodeLoads { first, loads } => WireData::NodeLoads { first, loads },
        }
    }

    fn from_wire(repr: WireData) -> DataMsg {
        match repr {
            WireData::Tick => DataMsg::Tick,
            WireData::Records {
                input,
                from,
                records,
            } => DataMsg::Records {
                input,
                from,
                batch: Batch::from_encoded(
                    records.type_name,
                    usize::try_from(records.len).unwrap_or(usize::MAX),
                    records.bytes,
                ),
            },
            WireData::Watermark {
                input,
                from,
                watermark_ms,
            } => DataMsg::Watermark {
                input,
                from,
                watermark_ms,
            },
            WireData::Barrier {
                input,
                from,
                epoch,
                declined,
            } => DataMsg::Barrier {
                input,
                from,
                epoch,
                declined,
            },
            WireData::Snapshot { epoch } => DataMsg::Snapshot { epoch },
            WireData::Replay => DataMsg::Replay,
            WireData::Fire => DataMsg::Fire,
            WireData::Reroute {
                stage,
                version,
                owners,
            } => DataMsg::Reroute {
                stage,
                version,
                owners: Arc::from(owners),
            },
            WireData::Rerouted {
                input,
                from,
                version,
                owners,
            } => DataMsg::Rerouted {
                input,
                from,
                version,
                owners: Arc::from(owners),
            },
            WireData::Handed {
                input,
                from,
                version,
            } => DataMsg::Handed {
                input,
                from,
                version,
            },
            WireData::After {
                input,
                from,
                giver,
                version,
            } => DataMsg::After {
                input,
                from,
                giver,
                version,
            },
            WireData::Handoff {
                from,
                version,
                owners,
                groups,
            } => DataMsg::Handoff {
                from,
                version,
                owners: Arc::from(owners),
                groups: groups
                    .into_iter()
                    .map(|(group, bytes)| (group, bytes.map(MovedGroup::Encoded)))
                    .collect(),
            },
            WireData::SinkDone => DataMsg::SinkDone,
            WireData::RerouteDone { stage, version } => DataMsg::RerouteDone { stage, version },
            WireData::JobFailed { error } => DataMsg::JobFailed { error },
            WireData::CheckpointPart(part) => DataMsg::CheckpointPart(Box::new(part)),
            WireData::CheckpointRequest { epoch, restored } => {
                DataMsg::CheckpointRequest { epoch, restored }
            }
            WireData::CheckpointOver { error } => DataMsg::CheckpointOver { error },
            WireData::NodeLoads { first, loads } => DataMsg::NodeLoads { first, loads },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::state::{KeyGroups, KeyedState, Stateful};
    use crate::runtime::remote::WireBatch;
    use crate::runtime::WireRepr;

    /// `messages` as they reach another node: each made its wire form, the
    /// whole encoded as a gateway batch, checked and decoded, and made a
    /// message again.
    fn crossed(messages: Vec<DataMsg>) -> Vec<DataMsg> {
        let wire: Vec<WireData> = messages.into_iter().map(Wire::into_wire).collect();
        let bytes = WireData::encode_batch(&WireBatch::of_messages(wire), Vec::new()).unwrap();
        let mut aligned = rkyv::util::AlignedVec::<16>::new();
        aligned.extend_from_slice(&bytes);
        let batch = WireData::decode_batch(&aligned).unwrap();
        batch
            .into_messages()
            .into_iter()
            .map(DataMsg::from_wire)
            .collect()
    }

    #[test]
    fn every_kind_of_message_crosses_as_it_was_sent() {
        let owners: Arc<[u32]> = vec![0, 1, 1, 0].into();
        let sent = vec![
            DataMsg::Tick,
            DataMsg::Records {
                input: 1,
                from: 3,
                batch: Batch::new(vec![(5u64, -7i64), (6, 8)]),
            },
            DataMsg::Watermark {
                input: 0,
                from: 2,
                watermark_ms: i64::MAX,
            },
            DataMsg::Barrier {
                input: 1,
                from: 4,
                epoch: 9,
                declined: true,
            },
            DataMsg::Snapshot { epoch: 10 },
            DataMsg::Replay,
            DataMsg::Fire,
            DataMsg::Reroute {
                stage: 2,
                version: 3,
                owners: owners.clone(),
            },
            DataMsg::Rerouted {
                input: 0,
                from: 1,
                version: 3,
                owners: owners.clone(),
            },
            DataMsg::Handed {
                input: 1,
                from: 0,
                version: 3,
            },
            DataMsg::After {
                input: 0,
                from: 1,
                giver: 0,
                version: 3,
            },
            DataMsg::SinkDone,
            DataMsg::RerouteDone {
                stage: 4,
                version: 5,
            },
            DataMsg::JobFailed {
                error: "source s partition 3: line 9".into(),
            },
            DataMsg::CheckpointRequest {
                epoch: 6,
                restored: 2,
            },
            DataMsg::CheckpointOver {
                error: Some("staging".into()),
            },
            DataMsg::NodeLoads {
                first: 2,
                loads: vec![850, 0, 60_000],
            },
        ];
        let got = crossed(sent);
        assert_eq!(got.len(), 17);
        let mut got = got.into_iter();
        assert!(matches!(got.next(), Some(DataMsg::Tick)));
        match got.next() {
            Some(DataMsg::Records { input, from, batch }) => {
                assert_eq!((input, from), (1, 3));
                assert_eq!(batch.into_vec::<(u64, i64)>(), vec![(5, -7), (6, 8)]);
            }
            _ => panic!("records"),
        }
        assert!(matches!(
            got.next(),
            Some(DataMsg::Watermark {
                input: 0,
                from: 2,
                watermark_ms: i64::MAX
            })
        ));
        assert!(matches!(
            got.next(),
            Some(DataMsg::Barrier {
                input: 1,
                from: 4,
                epoch: 9,
                declined: true
            })
        ));
        assert!(matches!(got.next(), Some(DataMsg::Snapshot { epoch: 10 })));
        assert!(matches!(got.next(), Some(DataMsg::Replay)));
        assert!(matches!(got.next(), Some(DataMsg::Fire)));
        match got.next() {
            Some(DataMsg::Reroute {
                stage: 2,
                version: 3,
                owners: o,
            }) => assert_eq!(o, owners),
            _ => panic!("reroute"),
        }
        match got.next() {
            Some(DataMsg::Rerouted {
                input: 0,
                from: 1,
                version: 3,
                owners: o,
            }) => assert_eq!(o, owners),
            _ => panic!("rerouted"),
        }
        assert!(matches!(
            got.next(),
            Some(DataMsg::Handed {
                input: 1,
                from: 0,
                version: 3
            })
        ));
        assert!(matches!(
            got.next(),
            Some(DataMsg::After {
                input: 0,
                from: 1,
                giver: 0,
                version: 3
            })
        ));
        assert!(matches!(got.next(), Some(DataMsg::SinkDone)));
        assert!(matches!(
            got.next(),
            Some(DataMsg::RerouteDone {
                stage: 4,
                version: 5
            })
        ));
        assert!(
            matches!(got.next(), Some(DataMsg::JobFailed { error }) if error == "source s partition 3: line 9")
        );
        assert!(matches!(
            got.next(),
            Some(DataMsg::CheckpointRequest {
                epoch: 6,
                restored: 2
            })
        ));
        assert!(
            matches!(got.next(), Some(DataMsg::CheckpointOver { error: Some(e) }) if e == "staging")
        );
        assert!(
            matches!(got.next(), Some(DataMsg::NodeLoads { first: 2, loads }) if loads == [850, 0, 60_000])
        );
    }

    #[test]
    fn key_groups_handed_over_cross_encoded_and_are_taken_whole() {
        let mut giver: KeyedState<String> = KeyGroups::default();
        giver.init(8);
        for key in 0..100u64 {
            giver.for_key(key).insert(key, format!("v{key}"));
        }
        let groups = giver.non_empty();
        let held: Vec<_> = groups.iter().map(|&g| giver.get(g).clone()).collect();
        let mut moved: Vec<(u32, Option<MovedGroup>)> =
            groups.iter().map(|&g| (g, giver.take_group(g))).collect();
        assert!(moved
            .iter()
            .all(|(_, m)| matches!(m, Some(MovedGroup::Held { .. }))));
        moved.push((7, None)); // an empty group
        let handoff = DataMsg::Handoff {
            from: 1,
            version: 2,
            owners: vec![0; 8].into(),
            groups: moved,
        };
        let Some(DataMsg::Handoff {
            from: 1,
            version: 2,
            owners,
            groups: arrived,
        }) = crossed(vec![handoff]).pop()
        else {
            panic!("a handoff")
        };
        assert_eq!(&owners[..], &[0; 8]);
        let mut taker: KeyedState<String> = KeyGroups::default();
        taker.init(8);
        for (group, moved) in arrived {
            match moved {
                Some(moved) => {
                    assert!(matches!(moved, MovedGroup::Encoded(_)));
                    taker.put_group(group, moved).unwrap();
                }
                None => assert_eq!(group, 7),
            }
        }
        assert_eq!(taker.non_empty(), groups);
        for (&group, held) in groups.iter().zip(&held) {
            assert_eq!(taker.get(group), held, "group {group} arrived as it was");
        }
    }
}

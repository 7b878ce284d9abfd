//! Log tests: round trip, a torn tail at every byte of the last record, a
//! flipped byte at every byte of a record, oversize lengths, and the write
//! error paths (ENOSPC from /dev/full, a partial write, a failed rollback).

use std::fs;
use std::path::PathBuf;

use super::*;

fn temp_dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("dirigo-storage-log-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic payload `i`: length varies from 0 to 299 bytes.
fn payload(i: u64) -> Vec<u8> {
    let length = (i.wrapping_mul(2654435761) % 300) as usize;
    (0..length).map(|j| (i as usize * 31 + j) as u8).collect()
}

/// Writes records `0..count` and returns their offsets.
fn write_log(path: &Path, count: u64) -> Vec<u64> {
    let mut writer = LogWriter::open(path, LogConfig::default()).unwrap();
    let offsets = (0..count)
        .map(|i| writer.append(i as u8, &payload(i)).unwrap())
        .collect();
    writer.sync().unwrap();
    offsets
}

fn read_all(path: &Path) -> Vec<(u64, u8, Vec<u8>)> {
    let mut reader = LogReader::open(path, LogConfig::default()).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        records.push((record.offset, record.kind, record.payload.to_vec()));
    }
    records
}

#[test]
fn many_records_round_trip_and_reopen_appends_after_them() {
    let dir = temp_dir("round-trip");
    let path = dir.join("shard-0.log");
    let offsets = write_log(&path, 1000);
    let records = read_all(&path);
    assert_eq!(records.len(), 1000);
    for (i, (offset, kind, bytes)) in records.iter().enumerate() {
        assert_eq!(*offset, offsets[i]);
        assert_eq!(*kind, i as u8);
        assert_eq!(*bytes, payload(i as u64));
    }

    let mut writer = LogWriter::open(&path, LogConfig::default()).unwrap();
    assert_eq!(writer.recovered().records, 1000);
    assert_eq!(writer.recovered().cut, None);
    let end = fs::metadata(&path).unwrap().len();
    assert_eq!(writer.append(9, b"after reopen").unwrap(), end);
    assert_eq!(read_all(&path).len(), 1001);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn torn_tail_at_every_byte_of_last_record_is_cut_to_previous_record() {
    let dir = temp_dir("torn");
    let whole = dir.join("whole.log");
    let offsets = write_log(&whole, 5);
    let last_start = offsets[4];
    let bytes = fs::read(&whole).unwrap();
    let last_bytes = bytes.len() as u64 - last_start;
    assert!(last_bytes > RECORD_HEADER_BYTES as u64 + 1);

    let torn = dir.join("torn.log");
    for kept in 0..last_bytes {
        fs::write(&torn, &bytes[..(last_start + kept) as usize]).unwrap();
        let recovered = recover(&torn, LogConfig::default()).unwrap();
        assert_eq!(recovered.records, 4, "kept {kept}");
        assert_eq!(recovered.bytes_valid, last_start, "kept {kept}");
        assert_eq!(
            fs::metadata(&torn).unwrap().len(),
            last_start,
            "kept {kept}"
        );
        let expected = if kept == 0 {
            None
        } else if kept < RECORD_HEADER_BYTES as u64 {
            Some(CutReason::ShortHeader {
                header_bytes_present: kept,
            })
        } else {
            Some(CutReason::ShortPayload {
                payload_bytes_expected: last_bytes - RECORD_HEADER_BYTES as u64,
                payload_bytes_present: kept - RECORD_HEADER_BYTES as u64,
            })
        };
        assert_eq!(recovered.cut.map(|c| c.reason), expected, "kept {kept}");
        if let Some(cut) = recovered.cut {
            assert_eq!(
                (cut.offset, cut.record_number, cut.bytes_cut),
                (last_start, 4, kept)
            );
        }
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flipped_byte_anywhere_in_a_record_is_detected_and_cut() {
    let dir = temp_dir("flip");
    let whole = dir.join("whole.log");
    let offsets = write_log(&whole, 6);
    let bytes = fs::read(&whole).unwrap();
    // Corrupt record 3 of 6: it and everything after it is cut.
    let (start, end) = (offsets[3], offsets[4]);
    let flipped = dir.join("flipped.log");
    for position in start..end {
        let mut corrupt = bytes.clone();
        corrupt[position as usize] ^= 0x40;
        fs::write(&flipped, &corrupt).unwrap();
        let recovered = recover(&flipped, LogConfig::default()).unwrap();
        let cut = recovered
            .cut
            .unwrap_or_else(|| panic!("flip at {position} undetected"));
        assert_eq!(
            (cut.offset, cut.record_number),
            (start, 3),
            "flip at {position}"
        );
        assert_eq!(cut.bytes_cut, bytes.len() as u64 - start);
        let field = position - start;
        if field >= 4 {
            assert!(
                matches!(cut.reason, CutReason::Checksum { .. }),
                "flip at {position}: {:?}",
                cut.reason
            );
        }
        assert_eq!(read_all(&flipped).len(), 3);
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reader_reports_corruption_with_record_number_and_offset() {
    let dir = temp_dir("reader");
    let path = dir.join("r.log");
    let offsets = write_log(&path, 3);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let mut reader = LogReader::open(&path, LogConfig::default()).unwrap();
    assert!(reader.next_record().unwrap().is_some());
    assert!(reader.next_record().unwrap().is_some());
    for _ in 0..2 {
        let error = reader.next_record().unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, StorageError::Corrupt { record_number: 2, offset, .. } if offset == offsets[2]),
            "{message}"
        );
        assert!(
            message.contains("record 2") && message.contains(&format!("offset {}", offsets[2])),
            "{message}"
        );
        assert!(
            message.contains("r.log") && message.contains("crc32c"),
            "{message}"
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn oversize_length_is_cut_on_recovery_and_refused_on_append() {
    let dir = temp_dir("oversize");
    let path = dir.join("o.log");
    let config = LogConfig {
        record_bytes_max: 64,
    };
    let mut writer = LogWriter::open(&path, config).unwrap();
    writer.append(1, &[0; 64 - RECORD_HEADER_BYTES]).unwrap();
    let error = writer
        .append(1, &[0; 64 - RECORD_HEADER_BYTES + 1])
        .unwrap_err();
    assert!(
        matches!(
            error,
            StorageError::RecordTooLarge {
                record_bytes: 65,
                record_bytes_max: 64,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        64,
        "a refused append writes nothing"
    );
    drop(writer);

    // A header announcing 4 GiB - 1 of payload, as garbage might.
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&[0; 5 + 100]);
    fs::write(&path, &bytes).unwrap();
    let recovered = recover(&path, config).unwrap();
    let cut = recovered.cut.unwrap();
    assert_eq!((recovered.records, cut.offset, cut.bytes_cut), (1, 64, 109));
    assert_eq!(
        cut.reason,
        CutReason::Oversize {
            record_bytes: u32::MAX as u64 + RECORD_HEADER_BYTES as u64,
            record_bytes_max: 64
        }
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn enospc_from_dev_full_is_an_error_naming_file_and_offset() {
    let path = Path::new("/dev/full");
    if !path.exists() {
        eprintln!("skipped: no /dev/full on this system");
        return;
    }
    let mut writer = LogWriter::open(path, LogConfig::default()).unwrap();
    let error = writer.append(1, b"does not fit").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28), "ENOSPC expected: {error}");
    let message = error.to_string();
    assert!(
        message.contains("/dev/full") && message.contains("offset 0"),
        "{message}"
    );
    assert_eq!(writer.end_offset(), 0);
}

#[test]
fn failed_append_rolls_back_and_keeps_earlier_records() {
    let dir = temp_dir("rollback");
    let path = dir.join("f.log");
    let mut writer = LogWriter::open(&path, LogConfig::default()).unwrap();
    for i in 0..3 {
        writer.append(i as u8, &payload(i + 1)).unwrap();
    }
    let end = writer.end_offset();
    writer.inject_fault(Fault {
        write_bytes_before_enospc: Some(12),
        truncate_fails: false,
    });
    let error = writer.append(7, &[7; 100]).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28));
    assert!(
        error.to_string().contains(&format!("offset {end}")),
        "{error}"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        end,
        "partial record rolled back"
    );
    // The writer stays usable, and the next record lands where the failed one would have.
    assert_eq!(writer.append(8, b"next").unwrap(), end);
    drop(writer);
    let recovered = recover(&path, LogConfig::default()).unwrap();
    assert_eq!((recovered.records, recovered.cut), (4, None));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn failed_rollback_poisons_writer_and_reopen_cuts_the_partial_record() {
    let dir = temp_dir("poison");
    let path = dir.join("p.log");
    let mut writer = LogWriter::open(&path, LogConfig::default()).unwrap();
    writer.append(1, b"kept").unwrap();
    let end = writer.end_offset();
    writer.inject_fault(Fault {
        write_bytes_before_enospc: Some(12),
        truncate_fails: true,
    });
    assert!(writer.append(2, &[2; 50]).is_err());
    let error = writer.append(3, b"refused").unwrap_err();
    assert!(
        matches!(error, StorageError::Poisoned { offset, .. } if offset == end),
        "{error}"
    );
    assert!(matches!(
        writer.sync().unwrap_err(),
        StorageError::Poisoned { .. }
    ));
    drop(writer);

    let writer = LogWriter::open(&path, LogConfig::default()).unwrap();
    let recovered = *writer.recovered();
    assert_eq!(recovered.records, 1);
    let cut = recovered.cut.unwrap();
    assert_eq!((cut.offset, cut.bytes_cut), (end, 12));
    assert_eq!(
        cut.reason,
        CutReason::ShortPayload {
            payload_bytes_expected: 50,
            payload_bytes_present: 3
        }
    );
    fs::remove_dir_all(&dir).unwrap();
}

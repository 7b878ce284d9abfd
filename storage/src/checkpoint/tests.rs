//! Checkpoint files: round trips; every cut and every single bit flip of a
//! chunk, a manifest and a staged file detected with an error naming the
//! file; retention; the exactly-once append rerun after each kind of crash;
//! injected `ENOSPC`; bounds and names.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

/// A fresh root for `test`, unique to this process.
fn temp_root(test: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "dirigo-storage-checkpoint-{test}-{}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&root);
    root
}

/// Deterministic bytes `i`, `len` long.
fn bytes(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 131 + j * 7) as u8).collect()
}

fn write_staged(dir: &CheckpointDir, name: &str, rows: &[u8]) -> StagedRef {
    let mut writer = dir.staged_writer(name).unwrap();
    writer.write_all(rows).unwrap();
    writer.finish().unwrap()
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Rewrites `path` with every shorter length and every single bit flip of
/// its content and checks that `read` fails each time with `CorruptFile`
/// naming the file; then restores the content and checks that it reads.
fn assert_every_cut_and_flip_detected(path: &Path, read: impl Fn() -> Result<(), StorageError>) {
    let good = fs::read(path).unwrap();
    read().expect("the undamaged file reads");
    let file_name = path.file_name().unwrap().to_str().unwrap();
    let check = |label: String, damaged: &[u8]| {
        fs::write(path, damaged).unwrap();
        match read() {
            Err(error @ StorageError::CorruptFile { .. }) => {
                assert!(error.to_string().contains(file_name), "{label}: {error}")
            }
            other => panic!("{label} of {file_name}: expected CorruptFile, got {other:?}"),
        }
    };
    for len in 0..good.len() {
        check(format!("cut to {len} bytes"), &good[..len]);
    }
    let mut flipped = good.clone();
    for bit in 0..good.len() * 8 {
        flipped[bit / 8] ^= 1 << (bit % 8);
        check(format!("flip of bit {bit}"), &flipped);
        flipped[bit / 8] ^= 1 << (bit % 8);
    }
    fs::write(path, &good).unwrap();
    read().expect("the restored file reads");
}

#[test]
fn chunk_parts_round_trip_one_by_one_in_runs_and_alone() {
    let root = temp_root("round-trip");
    let dir = CheckpointDir::open(&root).unwrap();
    // Small parts (runs), an empty one, 100 KiB ones adding up past one run,
    // and one larger than a run (read alone).
    let mut lens = vec![0, 1, 300];
    lens.extend([100 * 1024; 50]);
    lens.push(READ_RUN_BYTES_MAX + 1);
    lens.push(5);
    let parts: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| bytes(i, len))
        .collect();
    let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let refs = dir.write_chunk("chunk-a", &slices).unwrap();
    assert_eq!(refs.len(), parts.len());
    let mut offset = 0;
    for (part_ref, part) in refs.iter().zip(&parts) {
        assert_eq!(part_ref.offset, offset);
        assert_eq!(part_ref.len as usize, part.len());
        assert_eq!(part_ref.crc, crc32c::crc32c(part));
        offset += part_ref.frame_bytes();
    }
    assert_eq!(
        fs::metadata(root.join("checkpoints/chunk-a"))
            .unwrap()
            .len(),
        offset
    );
    assert_eq!(
        names(dir.checkpoints_dir()),
        ["chunk-a"],
        "no temp file left"
    );

    assert_eq!(dir.read_parts(&refs).unwrap(), parts);
    for (part_ref, part) in refs.iter().zip(&parts).step_by(7) {
        assert_eq!(dir.read_part(part_ref).unwrap(), *part);
    }
    // Out of order and across two chunks: each part still comes back in
    // the order asked.
    let refs_b = dir.write_chunk("chunk-b", &[b"b0", b"b1"]).unwrap();
    let mixed = vec![
        refs_b[1].clone(),
        refs[2].clone(),
        refs_b[0].clone(),
        refs[1].clone(),
        refs[0].clone(),
    ];
    let expected = vec![
        b"b1".to_vec(),
        parts[2].clone(),
        b"b0".to_vec(),
        parts[1].clone(),
        parts[0].clone(),
    ];
    assert_eq!(dir.read_parts(&mixed).unwrap(), expected);
    assert!(dir.read_parts(&[]).unwrap().is_empty());

    // Rewriting a chunk replaces it whole.
    let refs_b2 = dir.write_chunk("chunk-b", &[b"new"]).unwrap();
    assert_eq!(dir.read_part(&refs_b2[0]).unwrap(), b"new");
    assert!(dir.read_part(&refs_b[0]).is_err());
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn every_cut_and_bit_flip_of_a_chunk_is_detected() {
    let root = temp_root("chunk-damage");
    let dir = CheckpointDir::open(&root).unwrap();
    let refs = dir
        .write_chunk("chunk-7", &[b"first part", b"", b"third"])
        .unwrap();
    let path = root.join("checkpoints/chunk-7");
    assert_every_cut_and_flip_detected(&path, || dir.read_parts(&refs).map(drop));
    // A flip in one part leaves the others readable.
    let mut content = fs::read(&path).unwrap();
    content[refs[2].offset as usize + PART_HEADER_BYTES] ^= 1;
    fs::write(&path, &content).unwrap();
    assert_eq!(dir.read_part(&refs[0]).unwrap(), b"first part");
    let error = dir.read_part(&refs[2]).unwrap_err();
    assert!(matches!(
        error,
        StorageError::CorruptFile {
            offset,
            damage: Damage::Checksum { .. },
            ..
        } if offset == refs[2].offset
    ));
    // A reference that disagrees with the frame: another length, another
    // crc, an offset off the frame.
    let good = dir.write_chunk("chunk-8", &[b"abc", b"defg"]).unwrap();
    let mut wrong_len = good[0].clone();
    wrong_len.len = 2;
    let mut wrong_crc = good[0].clone();
    wrong_crc.crc ^= 1;
    let mut wrong_offset = good[1].clone();
    wrong_offset.offset -= 1;
    for part in [wrong_len, wrong_crc, wrong_offset] {
        let error = dir.read_part(&part).unwrap_err();
        assert!(matches!(error, StorageError::CorruptFile { .. }), "{error}");
    }
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn every_cut_and_bit_flip_of_a_manifest_is_detected() {
    let root = temp_root("manifest-damage");
    let dir = CheckpointDir::open(&root).unwrap();
    dir.commit_manifest(42, b"parts: c1@0, c1@22").unwrap();
    assert_eq!(dir.read_manifest(42).unwrap(), b"parts: c1@0, c1@22");
    let path = root.join("checkpoints/MANIFEST-00000000000000000042");
    assert_every_cut_and_flip_detected(&path, || dir.read_manifest(42).map(drop));

    // An empty body is a manifest too; a missing one is NotFound.
    dir.commit_manifest(0, b"").unwrap();
    assert_eq!(dir.read_manifest(0).unwrap(), b"");
    let error = dir.read_manifest(7).unwrap_err();
    assert_eq!(error.io_kind(), Some(io::ErrorKind::NotFound));
    assert!(error.to_string().contains("MANIFEST-00000000000000000007"));
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_manifest_under_another_epochs_name_is_refused() {
    let root = temp_root("manifest-epoch");
    let dir = CheckpointDir::open(&root).unwrap();
    dir.commit_manifest(1, b"epoch one").unwrap();
    let checkpoints = dir.checkpoints_dir();
    fs::copy(
        checkpoints.join("MANIFEST-00000000000000000001"),
        checkpoints.join("MANIFEST-00000000000000000002"),
    )
    .unwrap();
    let error = dir.read_manifest(2).unwrap_err();
    assert!(
        matches!(
            error,
            StorageError::CorruptFile {
                damage: Damage::Field {
                    field: "epoch",
                    expected: 2,
                    actual: 1
                },
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("MANIFEST-00000000000000000002"));
    fs::remove_dir_all(&root).unwrap();
}

/// A checkpoint of another format version (a build before the last change
/// to a part's encoding), intact otherwise, is refused naming the version.
#[test]
fn a_manifest_of_another_format_version_is_refused_naming_it() {
    let root = temp_root("manifest-version");
    let dir = CheckpointDir::open(&root).unwrap();
    dir.commit_manifest(5, b"body").unwrap();
    let path = root.join("checkpoints/MANIFEST-00000000000000000005");
    let mut bytes = fs::read(&path).unwrap();
    let older = MANIFEST_FORMAT_VERSION - 1;
    bytes[4..8].copy_from_slice(&older.to_le_bytes());
    // The crc made good again: only the version differs.
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..24]), &bytes[28..]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    let error = dir.read_manifest(5).unwrap_err();
    assert!(
        matches!(
            error,
            StorageError::CorruptFile {
                damage: Damage::Field {
                    field: "manifest format version",
                    expected,
                    actual,
                },
                ..
            } if expected == u64::from(MANIFEST_FORMAT_VERSION) && actual == u64::from(older)
        ),
        "{error}"
    );
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn every_cut_and_bit_flip_of_a_staged_file_is_detected() {
    let root = temp_root("staged-damage");
    let dir = CheckpointDir::open(&root).unwrap();
    let staged = write_staged(&dir, "rows-3", b"1,alice\n2,bob\n");
    let path = root.join("staged/rows-3");
    assert_every_cut_and_flip_detected(&path, || {
        dir.verify_staged(&staged.file, staged.len, staged.crc)
    });
    // A longer file is refused too.
    fs::write(&path, b"1,alice\n2,bob\n3,carol\n").unwrap();
    let error = dir
        .verify_staged(&staged.file, staged.len, staged.crc)
        .unwrap_err();
    assert!(
        matches!(
            error,
            StorageError::CorruptFile {
                damage: Damage::Long { .. },
                ..
            }
        ),
        "{error}"
    );
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_staged_write_waits_out_a_full_disk_and_keeps_every_byte() {
    let root = temp_root("staged-enospc");
    let faults = Faults::default();
    let dir = CheckpointDir::open(&root)
        .unwrap()
        .with_faults(faults.clone());
    // Three buffers and a bit: the first two buffer writes and the last
    // each fail twice, after landing half their bytes.
    let content = bytes(5, 3 * STAGED_BUFFER_BYTES + 333);
    let mut writer = dir.staged_writer("full").unwrap();
    faults.arm_staged_enospc(4);
    writer
        .write_all(&content[..2 * STAGED_BUFFER_BYTES + 1])
        .unwrap();
    assert_eq!(
        faults.staged_enospc_pending(),
        0,
        "every armed fault was hit"
    );
    faults.arm_staged_enospc(2);
    writer
        .write_all(&content[2 * STAGED_BUFFER_BYTES + 1..])
        .unwrap();
    let retried = writer.retried().expect("the failed writes are told");
    assert!(
        retried.contains("full") && retried.contains("os error 28"),
        "{retried}"
    );
    assert!(retried.contains("6 time(s)"), "{retried}");
    let staged = writer.finish().unwrap();
    assert_eq!(faults.staged_enospc_pending(), 0);
    assert_eq!(fs::read(root.join("staged/full")).unwrap(), content);
    assert_eq!(staged.len, content.len() as u64);
    assert_eq!(staged.crc, crc32c::crc32c(&content));

    // A write that never succeeded tells no retry.
    let mut writer = dir.staged_writer("fine").unwrap();
    writer.write_all(b"rows").unwrap();
    assert!(writer.retried().is_none());
    writer.finish().unwrap();
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_disk_full_for_longer_than_the_retry_window_fails_the_staged_file() {
    let root = temp_root("staged-full-for-good");
    let faults = Faults::default();
    let dir = CheckpointDir::open(&root)
        .unwrap()
        .with_faults(faults.clone())
        .with_staged_retry_for(Duration::from_millis(30));
    assert_eq!(dir.staged_retry_for(), Duration::from_millis(30));
    let mut writer = dir.staged_writer("s2").unwrap();
    writer.write_all(b"rows").unwrap();
    faults.arm_staged_enospc(u64::MAX);
    let started = Instant::now();
    let error = writer.finish().unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(error.raw_os_error(), Some(28), "{error}");
    assert!(error.to_string().contains("s2"), "{error}");
    assert!(names(dir.staged_dir()).is_empty(), "no half file is left");
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn staged_writer_counts_and_checksums_what_it_wrote() {
    let root = temp_root("staged-writer");
    let dir = CheckpointDir::open(&root).unwrap();
    // Pieces below and above the buffer size.
    let content = bytes(3, 3 * STAGED_BUFFER_BYTES + 17);
    let mut writer = dir.staged_writer("big").unwrap();
    assert!(writer.is_empty());
    let mut rest = &content[..];
    for piece_len in [1, 99, STAGED_BUFFER_BYTES + 5, 1000].iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*piece_len).min(rest.len()));
        writer.write_all(piece).unwrap();
        rest = tail;
    }
    assert_eq!(writer.len(), content.len() as u64);
    assert_eq!(writer.name(), "big");
    let staged = writer.finish().unwrap();
    assert_eq!(
        staged,
        StagedRef {
            file: "big".into(),
            len: content.len() as u64,
            crc: crc32c::crc32c(&content),
        }
    );
    assert_eq!(fs::read(root.join("staged/big")).unwrap(), content);
    dir.verify_staged("big", staged.len, staged.crc).unwrap();

    // A new writer of the same name truncates the old file.
    let small = write_staged(&dir, "big", b"small");
    assert_eq!(fs::read(root.join("staged/big")).unwrap(), b"small");
    assert_eq!(small.crc, crc32c::crc32c(b"small"));
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn append_output_gives_the_same_bytes_after_any_crash_and_rerun() {
    let root = temp_root("append");
    let dir = CheckpointDir::open(&root).unwrap();
    let staged = [
        write_staged(&dir, "epoch-5-a", b"row 1\nrow 2\n"),
        write_staged(&dir, "epoch-5-b", b""),
        write_staged(&dir, "epoch-5-c", b"row 3\n"),
    ];
    let output = root.join("out.csv");
    fs::write(&output, b"header\n").unwrap();
    let expected = b"header\nrow 1\nrow 2\nrow 3\n".to_vec();
    let len = dir.append_output(&output, 7, &staged).unwrap();
    assert_eq!(len, expected.len() as u64);
    assert_eq!(fs::read(&output).unwrap(), expected);

    // Each state a crash (or a run of an older process) may have left
    // behind; rerunning the append mends every one to the same bytes.
    let mut garbage_after = expected.clone();
    garbage_after.extend_from_slice(b"row 4 of an epoch never committed\n");
    let cases: [(&str, Vec<u8>); 5] = [
        ("append finished", expected.clone()),
        ("bytes after the append", garbage_after),
        ("append torn mid-row", expected[..12].to_vec()),
        ("append not started", b"header\n".to_vec()),
        (
            "other bytes past len_before",
            b"header\nXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX".to_vec(),
        ),
    ];
    for (case, left) in cases {
        fs::write(&output, &left).unwrap();
        assert_eq!(
            dir.append_output(&output, 7, &staged).unwrap(),
            len,
            "{case}"
        );
        assert_eq!(fs::read(&output).unwrap(), expected, "{case}");
    }

    // A missing output is created from length 0, and nothing staged only
    // cuts the output to its length before.
    let fresh = root.join("fresh.csv");
    assert_eq!(dir.append_output(&fresh, 0, &staged).unwrap(), 18);
    assert_eq!(fs::read(&fresh).unwrap(), b"row 1\nrow 2\nrow 3\n");
    assert_eq!(dir.append_output(&fresh, 6, &[]).unwrap(), 6);
    assert_eq!(fs::read(&fresh).unwrap(), b"row 1\n");
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn append_output_refuses_a_short_output_and_a_bad_staged_file_changing_nothing() {
    let root = temp_root("append-refused");
    let dir = CheckpointDir::open(&root).unwrap();
    let staged = [
        write_staged(&dir, "good", b"good rows\n"),
        write_staged(&dir, "bad", b"rows to damage\n"),
    ];
    let output = root.join("out.csv");

    // Shorter than len_before: bytes already appended were lost.
    fs::write(&output, b"head").unwrap();
    let error = dir.append_output(&output, 7, &staged).unwrap_err();
    assert!(
        matches!(
            error,
            StorageError::CorruptFile {
                offset: 4,
                damage: Damage::Short {
                    bytes_expected: 7,
                    bytes_present: 4
                },
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("out.csv"), "{error}");
    assert_eq!(fs::read(&output).unwrap(), b"head");

    // Missing with len_before > 0: refused, not created.
    let missing = root.join("missing.csv");
    let error = dir.append_output(&missing, 3, &staged).unwrap_err();
    assert!(error.to_string().contains("missing.csv"), "{error}");
    assert!(!missing.exists());

    // A damaged staged file: nothing appended, not even the good one before
    // it, and the output is not cut either.
    fs::write(root.join("staged/bad"), b"rows to damagE\n").unwrap();
    fs::write(&output, b"header\nleft by a crash").unwrap();
    let error = dir.append_output(&output, 7, &staged).unwrap_err();
    assert!(error.to_string().contains("bad"), "{error}");
    assert_eq!(fs::read(&output).unwrap(), b"header\nleft by a crash");
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn manifest_epochs_are_ascending_and_ignore_other_files() {
    let root = temp_root("epochs");
    let dir = CheckpointDir::open(&root).unwrap();
    assert!(dir.manifest_epochs().unwrap().is_empty());
    for epoch in [10, 2, u64::MAX] {
        dir.commit_manifest(epoch, b"m").unwrap();
    }
    dir.write_chunk("c", &[b"x"]).unwrap();
    let checkpoints = dir.checkpoints_dir();
    for stray in [
        ".MANIFEST-00000000000000000011.tmp",
        "MANIFEST-0000000000000000001",
        "MANIFEST-0000000000000000000x",
        "MANIFEST-99999999999999999999",
    ] {
        fs::write(checkpoints.join(stray), b"stray").unwrap();
    }
    assert_eq!(dir.manifest_epochs().unwrap(), [2, 10, u64::MAX]);
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn retain_deletes_exactly_the_dead_files_of_this_layer() {
    let root = temp_root("retain");
    let dir = CheckpointDir::open(&root).unwrap();
    let checkpoints = dir.checkpoints_dir().to_path_buf();
    for epoch in [1, 2, 3] {
        dir.commit_manifest(epoch, b"m").unwrap();
    }
    for name in [
        "c1",
        "c2",
        "c3",
        ".c1.tmp",
        ".c2.tmp",
        ".MANIFEST-00000000000000000001.tmp",
        ".MANIFEST-00000000000000000003.tmp",
        "MANIFEST-junk",
        ".hidden",
        "..tmp",
        ".tmp",
    ] {
        fs::write(checkpoints.join(name), b"x").unwrap();
    }
    fs::create_dir(checkpoints.join("subdir")).unwrap();
    fs::write(checkpoints.join("subdir/c1"), b"x").unwrap();
    for name in ["s1", "s2", ".s1.tmp"] {
        fs::write(dir.staged_dir().join(name), b"x").unwrap();
    }
    fs::write(root.join("c1"), b"not ours").unwrap();

    let live_chunks: HashSet<String> = ["c2".to_string(), "c3".to_string()].into();
    let live_staged: HashSet<String> = ["s2".to_string()].into();
    for round in 0..2 {
        dir.retain(&[3], &live_chunks, Some(&live_staged)).unwrap();
        assert_eq!(
            names(&checkpoints),
            [
                "..tmp",
                ".MANIFEST-00000000000000000003.tmp",
                ".c2.tmp",
                ".hidden",
                ".tmp",
                "MANIFEST-00000000000000000003",
                "MANIFEST-junk",
                "c2",
                "c3",
                "subdir",
            ],
            "round {round}"
        );
        assert_eq!(names(&checkpoints.join("subdir")), ["c1"]);
        assert_eq!(names(dir.staged_dir()), ["s2"]);
        assert_eq!(names(&root), ["c1", "checkpoints", "staged"]);
    }
    assert_eq!(dir.manifest_epochs().unwrap(), [3]);
    assert_eq!(dir.read_manifest(3).unwrap(), b"m");

    // Nothing kept: every file of the layer goes.
    dir.retain(&[], &HashSet::new(), Some(&HashSet::new()))
        .unwrap();
    assert!(dir.manifest_epochs().unwrap().is_empty());
    assert!(names(dir.staged_dir()).is_empty());
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn armed_faults_fail_each_write_with_enospc_leave_nothing_and_disarm() {
    let root = temp_root("faults");
    let faults = Faults::default();
    let dir = CheckpointDir::open(&root)
        .unwrap()
        .with_faults(faults.clone());
    dir.commit_manifest(1, b"last good").unwrap();
    // Armed through a clone, as a test would while a job runs.
    faults.arm_enospc(3);
    assert_eq!(dir.faults().enospc_pending(), 3);

    let error = dir.write_chunk("c2", &[b"part", b"part"]).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28), "{error}");
    assert!(error.to_string().contains("c2"), "{error}");
    let error = dir.commit_manifest(2, b"next").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28), "{error}");
    assert!(error.to_string().contains("MANIFEST-00000000000000000002"));
    let error = dir.commit_manifest(2, b"next").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28), "{error}");

    // No half file under any name, and the last manifest is intact.
    assert_eq!(
        names(dir.checkpoints_dir()),
        ["MANIFEST-00000000000000000001"]
    );
    assert!(names(dir.staged_dir()).is_empty());
    assert_eq!(dir.read_manifest(1).unwrap(), b"last good");

    // Disarmed after three: the same writes now succeed.
    assert_eq!(faults.enospc_pending(), 0);
    let refs = dir.write_chunk("c2", &[b"part"]).unwrap();
    assert_eq!(dir.read_part(&refs[0]).unwrap(), b"part");
    dir.commit_manifest(2, b"next").unwrap();
    assert_eq!(dir.manifest_epochs().unwrap(), [1, 2]);

    // The constructor arms; disarm clears.
    let faults = Faults::enospc(5);
    let dir = dir.with_faults(faults.clone());
    faults.disarm();
    dir.write_chunk("c3", &[b"x"]).unwrap();
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_names_and_oversize_parts_are_refused_before_any_write() {
    let root = temp_root("names");
    let dir = CheckpointDir::open(&root).unwrap();
    for name in [
        "",
        ".hidden",
        "a/b",
        "MANIFEST-00000000000000000001",
        "MANIFEST-x",
    ] {
        let error = dir.write_chunk(name, &[b"x"]).unwrap_err();
        assert!(
            matches!(error, StorageError::InvalidName { .. }),
            "{name:?}: {error}"
        );
    }
    for name in ["", ".hidden", "a/b", "../escape"] {
        assert!(dir.staged_writer(name).is_err(), "{name:?}");
        let error = dir.verify_staged(name, 0, 0).unwrap_err();
        assert!(
            matches!(error, StorageError::InvalidName { .. }),
            "{name:?}: {error}"
        );
        let part = PartRef {
            file: name.to_string(),
            offset: 0,
            len: 0,
            crc: 0,
        };
        let error = dir.read_part(&part).unwrap_err();
        assert!(
            matches!(error, StorageError::InvalidName { .. }),
            "{name:?}: {error}"
        );
    }

    // One byte over the bound: refused before anything is written (the
    // zeroed allocation is never touched, so this costs no memory).
    let oversize = vec![0u8; PART_BYTES_MAX as usize + 1];
    let error = dir.write_chunk("big", &[b"ok", &oversize]).unwrap_err();
    assert!(
        matches!(error, StorageError::FileTooLarge { .. }),
        "{error}"
    );
    assert!(names(dir.checkpoints_dir()).is_empty());
    let refs = dir.write_chunk("small", &[b"ok"]).unwrap();
    let mut huge = refs[0].clone();
    huge.len = u32::MAX;
    let error = dir.read_part(&huge).unwrap_err();
    assert!(
        matches!(error, StorageError::FileTooLarge { .. }),
        "{error}"
    );
    let mut far = refs[0].clone();
    far.offset = u64::MAX - 3;
    let error = dir.read_part(&far).unwrap_err();
    assert!(matches!(error, StorageError::CorruptFile { .. }), "{error}");
    let error = dir
        .read_part(&PartRef {
            file: "absent".into(),
            ..refs[0].clone()
        })
        .unwrap_err();
    assert_eq!(error.io_kind(), Some(io::ErrorKind::NotFound), "{error}");
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_chunk_written_on_a_glommio_executor_is_the_same_file_and_faults_alike() {
    let root = temp_root("async-chunk");
    let dir = CheckpointDir::open(&root).unwrap();
    let parts: Vec<Vec<u8>> = (0..5).map(|i| bytes(i, 1 + i * 3_001)).collect();
    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(256 << 10)
        .make()
        .unwrap();
    let refs = executor
        .run(dir.write_chunk_async("chunk-async", &parts))
        .unwrap();
    for (part_ref, part) in refs.iter().zip(&parts) {
        assert_eq!(&dir.read_part(part_ref).unwrap(), part);
    }
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    dir.write_chunk("chunk-blocking", &slices).unwrap();
    let checkpoints = root.join("checkpoints");
    assert_eq!(
        fs::read(checkpoints.join("chunk-async")).unwrap(),
        fs::read(checkpoints.join("chunk-blocking")).unwrap(),
        "the same bytes as the blocking writer"
    );
    // An armed fault fails it with ENOSPC and leaves no file behind.
    let dir = dir.with_faults(Faults::enospc(1));
    let error = executor
        .run(dir.write_chunk_async("chunk-full", &parts))
        .unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28), "{error}");
    let names: Vec<String> = fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("chunk-full")),
        "nothing of the failed write is left: {names:?}"
    );
    let _ = fs::remove_dir_all(&root);
}

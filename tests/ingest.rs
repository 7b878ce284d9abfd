//! The parallel file source through the real binary: a huge line fails the run
//! with its line number, and is never buffered whole (peak RSS stays bounded).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn ingest_a_300_mb_line_fails_naming_it_with_bounded_memory() {
    let dir = std::env::temp_dir().join(format!("dirigo-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("huge.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let good = r#"{"type":"bid","auction":1000,"bidder":1001,"price":5,"channel":"Apple","url":"u","date_time":1,"extra":""}"#;
    writeln!(file, "{good}").unwrap();
    write!(file, r#"{{"type":"bid","auction":1000,"bidder":1001,"price":5,"channel":"Apple","url":"u","date_time":1,"extra":""#).unwrap();
    let block = vec![b'x'; 1 << 20];
    for _ in 0..300 {
        file.write_all(&block).unwrap();
    }
    writeln!(file, "\"}}").unwrap();
    writeln!(file, "{good}").unwrap();
    file.flush().unwrap();
    drop(file);

    let mut child = Command::new(env!("CARGO_BIN_EXE_dirigo"))
        .args(["run", "q0", "--cores", "2", "--source"])
        .arg(format!("file:{}", path.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak_kib = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "dirigo run did not end");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("line 2: the line is longer than max_line_bytes (1048576 bytes)")
            && stderr.contains("huge.jsonl"),
        "{stderr}"
    );
    // Sampled while it ran (reading 300 MB takes far longer than one 5 ms sample).
    assert!(peak_kib > 0, "the child's RSS was never sampled");
    assert!(peak_kib < 200 * 1024, "peak RSS {peak_kib} KiB");
}

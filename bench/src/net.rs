//! `dirigo bench net`: messages from one node process to another over
//! loopback through `dirigo-net`'s session (the handshake, then the link:
//! 64-byte headers, every frame sealed with AES-128-GCM, acks and credit), against
//! a raw loopback TCP stream carrying the same message bodies, each after
//! its length (4 bytes) and nothing else (no checksum, header or seal),
//! in writes of up to the same `write_bytes`, in the same run.
//!
//! Each measurement starts a second process, this binary's hidden `dirigo
//! bench net-peer`, which listens on 127.0.0.1, takes `messages` messages
//! and checks each: its number (the first 8 bytes) must be the next, its
//! length and filler those sent. It counts what came twice (`duplicated`),
//! what skipped ahead (`out_of_order`) and what never came (`lost`), then
//! answers "done" and prints its counts as one JSON line. The sender's clock
//! runs from its first send to that answer, so both ways time the same
//! thing: every message taken by the other process.
//!
//! Runs alternate which way goes first. Figures are medians over the runs;
//! `lost`, `duplicated` and `out_of_order` are summed over every
//! measurement. A message here is what one actor send across nodes will be:
//! one body, which a batch of records fills (`message_bytes`, 512 by
//! default). Then `runs` times, `failover_ms` ([`crate::failover`]): a
//! node of three killed while it runs a job, until the job processes
//! again elsewhere.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::LocalExecutorBuilder;
use serde::{Deserialize, Serialize};

use dirigo_net::conn::{accept, connect};
use dirigo_net::handshake::Identity;
use dirigo_net::link::Role;
use dirigo_net::session::{Session, SessionConfig};

use crate::machine::Machine;
use crate::{median, progress, BenchError};

/// The bench's own cluster secret (both processes are this binary).
pub(crate) const SECRET: &[u8] = b"dirigo bench net: not a production secret";
const MESSAGE_KIND: u8 = 7;
const DONE_KIND: u8 = 8;

#[derive(Clone, Debug)]
pub struct Config {
    pub messages: u64,
    pub message_bytes: usize,
    pub runs: usize,
    /// The program to start as the other node: this binary.
    pub program: PathBuf,
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            messages: 1_000_000,
            message_bytes: 512,
            runs: 3,
            program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("dirigo")),
            progress: true,
        }
    }
}

/// Which way a measurement sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `dirigo-net`'s session: handshake, link frames, acks, credit.
    Link,
    /// The same bodies on a TCP stream, each after its length.
    Raw,
    /// Actor messages between two node processes: the engine's remote
    /// sends (see `net_actors`).
    Actors,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "link" => Ok(Mode::Link),
            "raw" => Ok(Mode::Raw),
            "actors" => Ok(Mode::Actors),
            other => Err(format!("mode {other:?}: link, raw or actors")),
        }
    }
}

/// What the receiving process counted.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub received: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub lost: u64,
    /// Messages whose length or filler differed from what was sent.
    pub damaged: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub run: usize,
    pub mode: Mode,
    pub msgs_per_s: f64,
    pub elapsed_s: f64,
    pub counts: Counts,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub messages: u64,
    pub message_bytes: usize,
    pub runs: usize,
    /// Actor messages from an actor on one node to one on another.
    pub cross_node_msgs_per_s: f64,
    pub raw_tcp_msgs_per_s: f64,
    /// `cross_node_msgs_per_s / raw_tcp_msgs_per_s`.
    pub cross_node_ratio: f64,
    /// The same bodies as messages of one session, no actors.
    pub session_msgs_per_s: f64,
    pub session_ratio: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub damaged: u64,
    /// Median over the runs: from a node's kill until its job processes
    /// again on another node.
    pub failover_ms: f64,
    /// Median over the runs: from the kill until the job is placed anew.
    pub failover_placed_ms: f64,
    /// As `failover_ms`, for a job of two shards running over two of the
    /// three nodes, its part 0's node killed.
    pub failover_over_nodes_ms: f64,
    pub failover_over_nodes_placed_ms: f64,
    pub note: &'static str,
    pub samples: Vec<Sample>,
    pub failover_samples: Vec<crate::failover::FailoverSample>,
}

pub const NOTE: &str = "two processes on loopback; cross_node: actor messages from an actor on one node process to \
an actor on the other (each process one shard and its gateway; the engine's credits and acks; batches of packets sized to \
about three quarters of a frame, at most about 512 messages, as rkyv archives split to fit 256 KiB frames, over the session); session: the same bodies as messages of dirigo-net's session (handshake, \
64-byte link header, every frame sealed with AES-128-GCM: body encrypted, header authenticated; acks and credit); raw_tcp: the same bodies \
on a TCP stream, each after its 4-byte length and nothing else, in writes of the same size bound; each timed from the first send \
until the receiving process has taken every message and said so; medians over the runs, the order alternated; \
failover_ms: three node processes, a paced q1 (200,000 events/s, checkpoints every 100 ms) into an exactly-once \
file sink, the job's node killed with SIGKILL, timed until the output grows again; failover_over_nodes_ms: the same \
job with two shards, over two of the three nodes, its part 0's node killed";

impl Report {
    /// Every message arrived once, in order, whole, in every measurement.
    pub fn exact(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.damaged == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dirigo bench net: {} messages of {} bytes, {} runs, on {} ({} cores)",
            self.messages, self.message_bytes, self.runs, self.machine, self.cores
        )?;
        writeln!(
            f,
            "  cross-node (actors)   {:>8.3} M msgs/s",
            self.cross_node_msgs_per_s / 1e6
        )?;
        writeln!(
            f,
            "  session alone         {:>8.3} M msgs/s",
            self.session_msgs_per_s / 1e6
        )?;
        writeln!(
            f,
            "  raw TCP               {:>8.3} M msgs/s",
            self.raw_tcp_msgs_per_s / 1e6
        )?;
        writeln!(f, "  cross_node_ratio      {:>8.3}", self.cross_node_ratio)?;
        writeln!(f, "  session_ratio         {:>8.3}", self.session_ratio)?;
        writeln!(
            f,
            "  lost {}, duplicated {}, out of order {}, damaged {}",
            self.lost, self.duplicated, self.out_of_order, self.damaged
        )?;
        writeln!(
            f,
            "  failover              {:>8.0} ms (placed anew after {:.0} ms)",
            self.failover_ms, self.failover_placed_ms
        )?;
        writeln!(
            f,
            "  failover over nodes   {:>8.0} ms (placed anew after {:.0} ms)",
            self.failover_over_nodes_ms, self.failover_over_nodes_placed_ms
        )?;
        write!(f, "note: {}", self.note)
    }
}

/// The body of message `index` (from 1): its number, then filler that
/// follows from it.
pub(crate) fn body(index: u64, bytes: usize) -> Vec<u8> {
    let mut body = index.to_le_bytes().to_vec();
    body.resize(bytes.max(8), (index as u8) ^ 0x5a);
    body
}

/// Check one received body against what message `expected` should be;
/// counts into `counts`. Its number comes from the body.
pub(crate) fn check(
    body_bytes: &[u8],
    message_bytes: usize,
    expected: &mut u64,
    counts: &mut Counts,
) {
    let Some(number) = body_bytes.get(..8) else {
        counts.damaged += 1;
        return;
    };
    let index = u64::from_le_bytes(number.try_into().expect("8 bytes"));
    if index < *expected {
        counts.duplicated += 1;
        return;
    }
    if index > *expected {
        counts.out_of_order += 1;
    }
    counts.received += 1;
    *expected = index + 1;
    let filler = (index as u8) ^ 0x5a;
    // Every byte compared, with no early exit, so that the loop runs on
    // vector registers: the check is both receivers' work, and a slow one
    // would hide the difference between the transports measured.
    let differs = body_bytes[8..]
        .iter()
        .fold(0u8, |acc, &b| acc | (b ^ filler));
    if body_bytes.len() != message_bytes.max(8) || differs != 0 {
        counts.damaged += 1;
    }
}

fn identity(node: u64) -> Identity {
    Identity::new("bench-net", node, SECRET).expect("a valid identity")
}

/// `dirigo bench net-peer`: listen, print `listening ADDR`, take `messages`
/// messages of one connection, answer "done", print the counts as JSON.
/// For `Mode::Actors`, node 1 of a run whose node 0 is at `node0`.
pub fn peer(
    mode: Mode,
    messages: u64,
    message_bytes: usize,
    node0: Option<SocketAddr>,
) -> Result<Counts, BenchError> {
    if mode == Mode::Actors {
        let node0 = node0
            .ok_or_else(|| BenchError("bench net peer: --mode actors needs --node0".into()))?;
        return crate::net_actors::peer(node0, messages, message_bytes);
    }
    let counts = LocalExecutorBuilder::default()
        .name("bench-net-peer")
        .io_memory(1 << 20)
        .spawn(move || async move { serve_peer(mode, messages, message_bytes).await })
        .map_err(|e| BenchError(format!("the peer's executor did not start: {e}")))?
        .join()
        .map_err(|e| BenchError(format!("the peer's executor failed: {e}")))??;
    println!(
        "{}",
        serde_json::to_string(&counts).expect("counts serialize")
    );
    Ok(counts)
}

async fn serve_peer(mode: Mode, messages: u64, message_bytes: usize) -> Result<Counts, BenchError> {
    let io = |e: std::io::Error| BenchError(format!("bench net peer: {e}"));
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| io(e.into()))?;
    let addr = listener.local_addr().map_err(|e| io(e.into()))?;
    println!("listening {addr}");
    let stream = listener.accept().await.map_err(|e| io(e.into()))?;
    let mut counts = Counts::default();
    let mut expected = 1;
    match mode {
        Mode::Link => {
            let config = SessionConfig::default();
            let conn = accept(stream, &identity(2), &config.conn)
                .await
                .map_err(|(_, e)| BenchError(format!("bench net peer: handshake: {e}")))?;
            let session = Session::new(config, 2);
            let server = glommio::spawn_local({
                let session = session.clone();
                async move { session.serve(conn, Role::Server).await }
            });
            while counts.received + counts.duplicated < messages {
                let Some((kind, got)) = session.recv_wait().await else {
                    break;
                };
                if kind != MESSAGE_KIND {
                    counts.damaged += 1;
                    continue;
                }
                check(&got, message_bytes, &mut expected, &mut counts);
            }
            session
                .send_wait(DONE_KIND, b"done".to_vec())
                .await
                .map_err(|e| BenchError(format!("bench net peer: {e:?}")))?;
            while session.unacked() > 0 && session.is_connected() {
                glommio::timer::sleep(Duration::from_micros(100)).await;
            }
            session.stop();
            let _ = server.await;
        }
        Mode::Raw => {
            let mut stream = stream;
            // Bodies read and not yet taken, from `taken` on.
            let mut buffer: Vec<u8> = Vec::with_capacity(128 * 1024);
            let mut taken = 0;
            let mut chunk = vec![0u8; 64 * 1024];
            'read: while counts.received + counts.duplicated < messages {
                let read = stream.read(&mut chunk).await.map_err(io)?;
                if read == 0 {
                    break;
                }
                buffer.extend_from_slice(&chunk[..read]);
                while let Some(length) = buffer
                    .get(taken..taken + 4)
                    .map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize)
                {
                    if length != message_bytes {
                        return Err(BenchError(format!(
                            "bench net peer: a raw body of {length} bytes, not {message_bytes}"
                        )));
                    }
                    let Some(got) = buffer.get(taken + 4..taken + 4 + length) else {
                        break;
                    };
                    check(got, message_bytes, &mut expected, &mut counts);
                    taken += 4 + length;
                    if counts.received + counts.duplicated >= messages {
                        break 'read;
                    }
                }
                buffer.drain(..taken);
                taken = 0;
            }
            stream.write_all(b"d").await.map_err(io)?;
            stream.close().await.map_err(io)?;
        }
        Mode::Actors => unreachable!("`peer` runs the actor mode's peer"),
    }
    counts.lost = messages.saturating_sub(counts.received);
    Ok(counts)
}

/// Start the peer process; its address and the child.
fn start_peer(
    config: &Config,
    mode: Mode,
) -> Result<(SocketAddr, std::process::Child), BenchError> {
    let mode_name = match mode {
        Mode::Link => "link",
        Mode::Raw => "raw",
        Mode::Actors => "actors",
    };
    let mut child = Command::new(&config.program)
        .args(["bench", "net-peer", "--mode", mode_name])
        .args(["--messages", &config.messages.to_string()])
        .args(["--message-bytes", &config.message_bytes.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError(format!("starting {}: {e}", config.program.display())))?;
    let stdout = child.stdout.as_mut().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| BenchError(format!("the peer's address: {e}")))?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| BenchError(format!("the peer said {line:?}, not its address")))?;
    Ok((addr, child))
}

/// The peer process, killed and reaped if a measurement fails before it
/// ends by itself.
struct PeerProcess(Option<std::process::Child>);

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How long one measurement may take before it is an error (a peer or a
/// session that stopped answering).
pub(crate) const MEASUREMENT_MAX: Duration = Duration::from_secs(300);

/// One measurement: send every message to a fresh peer process; the rate
/// and what the peer counted.
fn measure(config: &Config, mode: Mode) -> Result<(f64, f64, Counts), BenchError> {
    if mode == Mode::Actors {
        return crate::net_actors::measure(config);
    }
    let (addr, child) = start_peer(config, mode)?;
    let mut child = PeerProcess(Some(child));
    let (messages, message_bytes) = (config.messages, config.message_bytes);
    let elapsed = LocalExecutorBuilder::default()
        .name("bench-net")
        .io_memory(1 << 20)
        .spawn(move || async move {
            let work = async { Ok(send_all(addr, mode, messages, message_bytes).await) };
            match glommio::timer::timeout(MEASUREMENT_MAX, work).await {
                Ok(result) => result,
                Err(_) => Err(BenchError(format!(
                    "bench net: {mode:?} did not finish within {MEASUREMENT_MAX:?}"
                ))),
            }
        })
        .map_err(|e| BenchError(format!("the sender's executor did not start: {e}")))?
        .join()
        .map_err(|e| BenchError(format!("the sender's executor failed: {e}")))??;
    let output = child
        .0
        .take()
        .expect("not taken before")
        .wait_with_output()
        .map_err(|e| BenchError(format!("the peer process: {e}")))?;
    if !output.status.success() {
        return Err(BenchError(format!(
            "the peer process failed: {}",
            output.status
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().last().unwrap_or_default();
    let counts: Counts = serde_json::from_str(last)
        .map_err(|e| BenchError(format!("the peer's counts {last:?}: {e}")))?;
    let seconds = elapsed.as_secs_f64();
    Ok((messages as f64 / seconds, seconds, counts))
}

async fn send_all(
    addr: SocketAddr,
    mode: Mode,
    messages: u64,
    message_bytes: usize,
) -> Result<Duration, BenchError> {
    let io = |e: std::io::Error| BenchError(format!("bench net: {e}"));
    let config = SessionConfig::default();
    match mode {
        Mode::Link => {
            let conn = connect(addr, &identity(1), &config.conn)
                .await
                .map_err(|e| BenchError(format!("bench net: connecting: {e}")))?;
            let session = Session::new(config, 1);
            let client = glommio::spawn_local({
                let session = session.clone();
                async move { session.serve(conn, Role::Client).await }
            });
            let started = Instant::now();
            for i in 1..=messages {
                session
                    .send_wait(MESSAGE_KIND, body(i, message_bytes))
                    .await
                    .map_err(|e| BenchError(format!("bench net: {e:?}")))?;
            }
            let answer = session.recv_wait().await;
            let elapsed = started.elapsed();
            let Some((kind, _)) = answer else {
                return Err(BenchError(
                    "bench net: the session stopped before the answer".into(),
                ));
            };
            if kind != DONE_KIND {
                return Err(BenchError(format!(
                    "bench net: the peer answered kind {kind}"
                )));
            }
            // Let the peer's "done" be acked before hanging up.
            glommio::timer::sleep(Duration::from_millis(5)).await;
            session.stop();
            let _ = client.await;
            Ok(elapsed)
        }
        Mode::Raw => {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| io(e.into()))?;
            stream.set_nodelay(true).map_err(|e| io(e.into()))?;
            let write_bytes = config.write_bytes;
            let mut out = Vec::with_capacity(write_bytes + 4 + message_bytes);
            let started = Instant::now();
            for i in 1..=messages {
                // A raw stream: each body after its length, nothing else.
                out.extend_from_slice(&(message_bytes as u32).to_le_bytes());
                out.extend_from_slice(&body(i, message_bytes));
                if out.len() >= write_bytes {
                    stream.write_all(&out).await.map_err(io)?;
                    out.clear();
                }
            }
            stream.write_all(&out).await.map_err(io)?;
            let mut done = [0u8; 1];
            stream.read_exact(&mut done).await.map_err(io)?;
            Ok(started.elapsed())
        }
        Mode::Actors => unreachable!("`measure` runs the actor mode"),
    }
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    if config.messages == 0 || config.runs == 0 {
        return Err(BenchError("messages and runs must be at least 1".into()));
    }
    let frame_max = SessionConfig::default().link.frame.payload_bytes_max()
        - dirigo_net::link::LINK_HEADER_BYTES;
    if config.message_bytes < 8 || config.message_bytes > frame_max {
        return Err(BenchError(format!(
            "--message-bytes {}: from 8 to {frame_max}",
            config.message_bytes
        )));
    }
    let machine = Machine::detect();
    let mut samples = Vec::new();
    for run in 1..=config.runs {
        let order = if run % 2 == 1 {
            [Mode::Actors, Mode::Raw, Mode::Link]
        } else {
            [Mode::Link, Mode::Raw, Mode::Actors]
        };
        for mode in order {
            let (rate, elapsed_s, counts) = measure(config, mode)?;
            progress(
                config.progress,
                format_args!(
                    "net: run {run}/{}: {mode:?}: {:.3} M msgs/s ({elapsed_s:.2} s); {counts:?}",
                    config.runs,
                    rate / 1e6
                ),
            );
            samples.push(Sample {
                run,
                mode,
                msgs_per_s: rate,
                elapsed_s,
                counts,
            });
        }
    }
    let rates = |mode| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.mode == mode)
            .map(|s| s.msgs_per_s)
            .collect()
    };
    let mut failover_samples = Vec::new();
    for run in 1..=config.runs {
        for shards in [1, 2] {
            let sample = crate::failover::measure(&config.program, run, shards)?;
            progress(
                config.progress,
                format_args!(
                    "net: failover {run}/{} ({shards} shards): {:.0} ms (placed after {:.0} ms, leader killed: {})",
                    config.runs, sample.failover_ms, sample.placed_ms, sample.leader_killed
                ),
            );
            failover_samples.push(sample);
        }
    }
    let failover_of = |shards: u32, placed: bool| -> Vec<f64> {
        failover_samples
            .iter()
            .filter(|s| s.shards == shards)
            .map(|s| if placed { s.placed_ms } else { s.failover_ms })
            .collect()
    };
    let cross = median(&rates(Mode::Actors));
    let session = median(&rates(Mode::Link));
    let raw = median(&rates(Mode::Raw));
    let sum = |f: fn(&Counts) -> u64| samples.iter().map(|s| f(&s.counts)).sum();
    Ok(Report {
        machine: machine.machine,
        cores: machine.cores,
        messages: config.messages,
        message_bytes: config.message_bytes,
        runs: config.runs,
        cross_node_msgs_per_s: cross,
        raw_tcp_msgs_per_s: raw,
        cross_node_ratio: cross / raw,
        session_msgs_per_s: session,
        session_ratio: session / raw,
        lost: sum(|c| c.lost),
        duplicated: sum(|c| c.duplicated),
        out_of_order: sum(|c| c.out_of_order),
        damaged: sum(|c| c.damaged),
        failover_ms: median(&failover_of(1, false)),
        failover_placed_ms: median(&failover_of(1, true)),
        failover_over_nodes_ms: median(&failover_of(2, false)),
        failover_over_nodes_placed_ms: median(&failover_of(2, true)),
        note: NOTE,
        samples,
        failover_samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The receivers' check: a body as sent passes; one byte changed
    /// anywhere in the filler, a wrong length, a repeat or a skip is
    /// counted.
    #[test]
    fn the_check_counts_every_kind_of_wrong_message() {
        let mut counts = Counts::default();
        let mut expected = 1;
        check(&body(1, 512), 512, &mut expected, &mut counts);
        assert_eq!((counts.received, counts.damaged), (1, 0));
        for (index, at) in [(2, 8), (3, 100), (4, 511)] {
            let mut changed = body(index, 512);
            changed[at] ^= 1;
            check(&changed, 512, &mut expected, &mut counts);
        }
        assert_eq!(counts.damaged, 3);
        check(&body(5, 500), 512, &mut expected, &mut counts);
        assert_eq!(counts.damaged, 4);
        check(&body(5, 512), 512, &mut expected, &mut counts);
        assert_eq!(counts.duplicated, 1);
        check(&body(9, 512), 512, &mut expected, &mut counts);
        assert_eq!(counts.out_of_order, 1);
    }
}

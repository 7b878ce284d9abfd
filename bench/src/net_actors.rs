//! `dirigo bench net`'s actor measurement: one actor on one node process
//! sends numbered bodies to an actor on another, through the engine's
//! remote actor sends (`Runtime::start_remote`: each process one shard and
//! its gateway, batches of packets as rkyv archives over an authenticated,
//! sealed session), with the engine's credits and acks.
//!
//! The parent process is node 0 (the sender and a reporter actor); the
//! peer, this binary's hidden `bench net-peer --mode actors`, is node 1
//! (the receiver, which checks every body as the other measurements'
//! receivers do). A ping goes over and back first, so the clock starts
//! with both gateways connected, as the other measurements start after
//! their connection; it runs from the first body sent until the
//! reporter hears the receiver took every message. The peer prints its
//! counts once the parent closes its standard input.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirigo_engine::runtime::{
    MemoryStateStore, RemoteConfig, RemoteNode, RuntimeConfig, ShardConfig, WireValue,
};
use dirigo_engine::{Actor, ActorId, BoxActor, Context, JobId, Runtime, SchedCtx};

use crate::net::{body, check, Config, Counts, MEASUREMENT_MAX, SECRET};
use crate::BenchError;

const JOB: JobId = JobId(1);
/// Bodies the sender sends per turn before it sends itself the next `Go`.
const SENDS_PER_TURN: u64 = 256;

fn sender() -> ActorId {
    ActorId::new(JOB, 1, 0) // shard 0: node 0
}
fn receiver() -> ActorId {
    ActorId::new(JOB, 2, 1) // shard 1: node 1
}
fn reporter() -> ActorId {
    ActorId::new(JOB, 3, 0) // shard 0: node 0
}

#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum NetMsg {
    Ping,
    Pong,
    Go,
    Body(Vec<u8>),
    Done {
        received: u64,
        duplicated: u64,
        out_of_order: u64,
        damaged: u64,
    },
}

impl WireValue for NetMsg {}

/// What the reporter (node 0) or the receiver (node 1) tells its process.
enum Heard {
    Pong,
    Done(Counts),
}

struct Sender {
    messages: u64,
    message_bytes: usize,
    sent: u64,
}

impl Actor for Sender {
    type Message = NetMsg;

    fn handle(&mut self, message: NetMsg, ctx: &mut Context<'_, NetMsg>) {
        if !matches!(message, NetMsg::Go) {
            return;
        }
        for _ in 0..SENDS_PER_TURN {
            if self.sent == self.messages {
                return;
            }
            self.sent += 1;
            ctx.send(
                receiver(),
                NetMsg::Body(body(self.sent, self.message_bytes)),
            );
        }
        if self.sent < self.messages {
            ctx.send(ctx.me(), NetMsg::Go);
        }
    }

    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }

    fn may_deactivate(&self) -> bool {
        false
    }
}

struct Receiver {
    messages: u64,
    message_bytes: usize,
    expected: u64,
    counts: Counts,
    told: mpsc::Sender<Heard>,
}

impl Actor for Receiver {
    type Message = NetMsg;

    fn handle(&mut self, message: NetMsg, ctx: &mut Context<'_, NetMsg>) {
        match message {
            NetMsg::Ping => ctx.send(reporter(), NetMsg::Pong),
            NetMsg::Body(got) => {
                check(
                    &got,
                    self.message_bytes,
                    &mut self.expected,
                    &mut self.counts,
                );
                let c = &mut self.counts;
                if c.received + c.duplicated == self.messages {
                    c.lost = self.messages.saturating_sub(c.received);
                    ctx.send(
                        reporter(),
                        NetMsg::Done {
                            received: c.received,
                            duplicated: c.duplicated,
                            out_of_order: c.out_of_order,
                            damaged: c.damaged,
                        },
                    );
                    let _ = self.told.send(Heard::Done(*c));
                }
            }
            _ => {}
        }
    }

    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }

    fn may_deactivate(&self) -> bool {
        false
    }
}

struct Reporter(mpsc::Sender<Heard>);

impl Actor for Reporter {
    type Message = NetMsg;

    fn handle(&mut self, message: NetMsg, _ctx: &mut Context<'_, NetMsg>) {
        let heard = match message {
            NetMsg::Pong => Heard::Pong,
            NetMsg::Done {
                received,
                duplicated,
                out_of_order,
                damaged,
            } => Heard::Done(Counts {
                received,
                duplicated,
                out_of_order,
                damaged,
                lost: 0,
            }),
            _ => return,
        };
        let _ = self.0.send(heard);
    }

    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }
}

fn start_node(
    me: usize,
    listener: TcpListener,
    nodes: [SocketAddr; 2],
    messages: u64,
    message_bytes: usize,
    told: mpsc::Sender<Heard>,
) -> Result<Runtime<NetMsg>, BenchError> {
    let factory = move |id: ActorId, _: Option<&[u8]>| -> BoxActor<NetMsg> {
        match id.operator {
            1 => Box::new(Sender {
                messages,
                message_bytes,
                sent: 0,
            }),
            2 => Box::new(Receiver {
                messages,
                message_bytes,
                expected: 1,
                counts: Counts::default(),
                told: told.clone(),
            }),
            _ => Box::new(Reporter(told.clone())),
        }
    };
    let config = RuntimeConfig {
        shards: 1,
        // Two processes of one shard each share the cores: no pinning
        // (both would take the first core).
        pin: false,
        shard: ShardConfig {
            idle_timeout_ns: None,
            ..ShardConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let remote = RemoteConfig {
        nodes: nodes
            .iter()
            .map(|&addr| RemoteNode { addr, shards: 1 })
            .collect(),
        me,
        listener,
        cluster: "bench-net".into(),
        secret: SECRET.to_vec(),
        incarnation: me as u64 + 1,
    };
    Runtime::start_remote(
        config,
        remote,
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
    )
    .map_err(|e| BenchError(format!("bench net: node {me}: {e}")))
}

fn bind() -> Result<(TcpListener, SocketAddr), BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError(format!("bench net: listening: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError(format!("bench net: {e}")))?;
    Ok((listener, addr))
}

/// `dirigo bench net-peer --mode actors --node0 ADDR`: node 1. Prints
/// `listening ADDR`, runs until its receiver took every message and its
/// standard input ends, then prints the counts as JSON.
pub fn peer(node0: SocketAddr, messages: u64, message_bytes: usize) -> Result<Counts, BenchError> {
    let (listener, addr) = bind()?;
    let (told, heard) = mpsc::channel();
    let runtime = start_node(1, listener, [node0, addr], messages, message_bytes, told)?;
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    let counts = loop {
        match heard.recv_timeout(MEASUREMENT_MAX) {
            Ok(Heard::Done(counts)) => break counts,
            Ok(Heard::Pong) => continue,
            Err(_) => {
                return Err(BenchError(format!(
                    "bench net peer: not every message within {MEASUREMENT_MAX:?}"
                )))
            }
        }
    };
    // The Done crosses back through this node's gateway: stay until the
    // parent heard it and hangs up.
    let mut rest = String::new();
    let _ = std::io::stdin().read_line(&mut rest);
    runtime.shutdown();
    println!(
        "{}",
        serde_json::to_string(&counts).expect("counts serialize")
    );
    Ok(counts)
}

/// One measurement of actor messages: the rate, the seconds, the peer's counts.
pub fn measure(config: &Config) -> Result<(f64, f64, Counts), BenchError> {
    let (listener, addr) = bind()?;
    let mut child = Command::new(&config.program)
        .args(["bench", "net-peer", "--mode", "actors"])
        .args(["--messages", &config.messages.to_string()])
        .args(["--message-bytes", &config.message_bytes.to_string()])
        .args(["--node0", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError(format!("starting {}: {e}", config.program.display())))?;
    let result = measure_with(config, listener, addr, &mut child);
    if result.is_err() {
        let _ = child.kill();
    }
    drop(child.stdin.take()); // the peer's cue to print its counts and exit
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
    let status = child
        .wait()
        .map_err(|e| BenchError(format!("the peer process: {e}")))?;
    let (rate, seconds) = result?;
    if !status.success() {
        return Err(BenchError(format!("the peer process failed: {status}")));
    }
    let last = text.lines().last().unwrap_or_default();
    let counts: Counts = serde_json::from_str(last)
        .map_err(|e| BenchError(format!("the peer's counts {last:?}: {e}")))?;
    Ok((rate, seconds, counts))
}

fn measure_with(
    config: &Config,
    listener: TcpListener,
    addr: SocketAddr,
    child: &mut std::process::Child,
) -> Result<(f64, f64), BenchError> {
    let stdout = child.stdout.as_mut().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| BenchError(format!("the peer's address: {e}")))?;
    let peer: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| BenchError(format!("the peer said {line:?}, not its address")))?;
    let (told, heard) = mpsc::channel();
    let runtime = start_node(
        0,
        listener,
        [addr, peer],
        config.messages,
        config.message_bytes,
        told,
    )?;
    let sched = SchedCtx {
        job: JOB,
        ..SchedCtx::default()
    };
    let wait = |what: &str| -> Result<Heard, BenchError> {
        heard
            .recv_timeout(MEASUREMENT_MAX)
            .map_err(|_| BenchError(format!("bench net: no {what} within {MEASUREMENT_MAX:?}")))
    };
    let send = |to, message| {
        runtime
            .send(to, message, sched)
            .map_err(|e| BenchError(format!("bench net: {e}")))
    };
    send(receiver(), NetMsg::Ping)?;
    while !matches!(wait("pong")?, Heard::Pong) {}
    let started = Instant::now();
    send(sender(), NetMsg::Go)?;
    loop {
        if let Heard::Done(_) = wait("answer")? {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    runtime.shutdown();
    // Let the peer's own shutdown not race the parent's.
    std::thread::sleep(Duration::from_millis(1));
    Ok((config.messages as f64 / seconds, seconds))
}

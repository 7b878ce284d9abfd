//! The cluster's client commands: `dirigo submit`, `status`, `cancel` and
//! `remove`, each one authenticated request to a node
//! (`crate::node::client`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::node::client::{self, read_secret, Reply, Request, CLIENT_NODE};
use dirigo_net::handshake::Identity;

/// How a client reaches a node.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// A node's address.
    #[arg(long)]
    to: SocketAddr,
    /// File holding the cluster's shared secret.
    #[arg(long)]
    secret_file: PathBuf,
    /// The cluster's name.
    #[arg(long, default_value = "dirigo")]
    cluster: String,
}

impl ClientArgs {
    fn request(&self, request: Request) -> Result<Reply, String> {
        let secret = read_secret(&self.secret_file)?;
        let identity = Identity::new(&self.cluster, CLIENT_NODE, &secret)?;
        match client::request(self.to, identity, request)? {
            Reply::Error { message } => Err(message),
            reply => Ok(reply),
        }
    }
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The query: q0, q1, q2, q3, q4, q5, q7 or q8.
    query: String,
    /// `dirigo run`'s flags for the job (--data-dir and --cores required;
    /// paths are read from this directory).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "RUN FLAGS"
    )]
    flags: Vec<String>,
}

pub fn submit(args: SubmitArgs) -> Result<(), String> {
    super::run::check_cluster_job(&args.query, &args.flags)?;
    let cwd = std::env::current_dir()
        .map_err(|e| format!("the current directory: {e}"))?
        .display()
        .to_string();
    match args.client.request(Request::Submit {
        query: args.query,
        args: args.flags,
        cwd,
    })? {
        Reply::Submitted { job } => {
            println!("{job}");
            Ok(())
        }
        other => Err(format!("an unexpected reply: {other:?}")),
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print the status as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs) -> Result<(), String> {
    let Reply::Status { status } = args.client.request(Request::Status)? else {
        return Err("an unexpected reply to status".into());
    };
    if args.json {
        println!("{status}");
        return Ok(());
    }
    println!("leader  node {}", status["leader"]);
    for node in status["nodes"].as_array().into_iter().flatten() {
        let mut line = format!(
            "node    {:<20} {:<22} {:<6} {}",
            node["id"],
            node["addr"].as_str().unwrap_or(""),
            if node["leaving"] == true {
                if node["alive"] == true {
                    "leaving"
                } else {
                    "left"
                }
            } else if node["alive"] == true {
                "alive"
            } else {
                "lost"
            },
            if node["voter"] == true {
                "voter"
            } else {
                "learner"
            }
        );
        // Where the answering node knows them (the leader: every node's).
        let used = node["cpu_milli"].as_u64().map(|m| m as f64 / 1e3);
        match (used, node["cores"].as_u64()) {
            (Some(used), Some(cores)) => {
                line.push_str(&format!(", runs use {used:.2} of {cores} cores"))
            }
            (Some(used), None) => line.push_str(&format!(", runs use {used:.2} cores")),
            (None, Some(cores)) => line.push_str(&format!(", {cores} cores")),
            (None, None) => {}
        }
        println!("{line}");
    }
    for job in status["jobs"].as_array().into_iter().flatten() {
        // Part 0's node first, then the others of a job over several.
        let nodes: Vec<String> = std::iter::once(&job["node"])
            .chain(job["peers"].as_array().into_iter().flatten())
            .map(serde_json::Value::to_string)
            .collect();
        let mut line = format!(
            "job     {:<12} {:<10} node{} {} epoch {}",
            job["name"].as_str().unwrap_or(""),
            job["state"].as_str().unwrap_or(""),
            if nodes.len() > 1 { "s" } else { "" },
            nodes.join(", "),
            job["epoch"]
        );
        if let Some(outputs) = job["outputs"].as_u64() {
            line.push_str(&format!(", {outputs} rows"));
        }
        if let Some(milli) = job["cpu_milli"].as_u64() {
            line.push_str(&format!(", {:.2} cores", milli as f64 / 1e3));
        }
        if let Some(of_slo) = job["latency_p99_of_slo"].as_f64() {
            line.push_str(&format!(", p99 {of_slo:.2} of its SLO"));
        }
        if let Some(error) = job["error"].as_str() {
            line.push_str(&format!(": {error}"));
        }
        println!("{line}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The job's name, as submit printed it.
    job: String,
}

pub fn cancel(args: CancelArgs) -> Result<(), String> {
    match args.client.request(Request::Cancel { job: args.job })? {
        Reply::Cancelled { job } => {
            println!("{job} cancelled");
            Ok(())
        }
        other => Err(format!("an unexpected reply: {other:?}")),
    }
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node's id, as `status` lists it.
    node: u64,
}

pub fn remove(args: RemoveArgs) -> Result<(), String> {
    match args.client.request(Request::Remove { node: args.node })? {
        Reply::Removing { node } => {
            println!("node {node} is leaving: its jobs move, then it stops");
            Ok(())
        }
        other => Err(format!("an unexpected reply: {other:?}")),
    }
}

//! `dirigo gen`: Nexmark events as JSON Lines (NEXMARK.md's interchange format), on
//! stdout or into a file.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use dirigo_nexmark::{write_json_line, Generator, GeneratorConfig};

#[derive(Args, Debug)]
pub struct GenArgs {
    /// Events to write.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Nominal rate (events per second of event time).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Write to this file instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: GenArgs) -> Result<(), String> {
    let config = GeneratorConfig {
        seed: args.seed,
        events_per_second: args.rate,
        ..GeneratorConfig::default()
    };
    let generator = Generator::new(config).map_err(|e| e.to_string())?;
    let (mut out, target): (Box<dyn Write>, String) = match &args.out {
        Some(path) => (
            Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                std::fs::File::create(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?,
            )),
            path.display().to_string(),
        ),
        None => (
            Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                std::io::stdout().lock(),
            )),
            "stdout".into(),
        ),
    };
    let mut events = Vec::with_capacity(1024);
    let mut line = Vec::with_capacity(1 << 20);
    let mut n = 0;
    while n < args.events {
        let end = (n + 1024).min(args.events);
        events.clear();
        generator.fill(n..end, &mut events);
        line.clear();
        for event in &events {
            write_json_line(event, &mut line);
        }
        out.write_all(&line)
            .map_err(|e| format!("cannot write to {target} after {n} events: {e}"))?;
        n = end;
    }
    out.flush()
        .map_err(|e| format!("cannot write to {target}: {e}"))
}

//! The `dirigo bench nexmark` suite: each query at full speed with the null sink,
//! then paced at half that rate for latency. The baseline, measured in the same run,
//! is the bare generator on the same number of threads: how fast events can be made
//! at all, so each query's throughput is also reported as a fraction of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dirigo_nexmark::queries::{EventSource, Output, QUERIES};
use dirigo_nexmark::run::{run_query, RunConfig};
use dirigo_nexmark::{Generator, GeneratorConfig};
use serde::Serialize;

use crate::machine::Machine;
use crate::BenchError;

/// `dirigo bench nexmark` options.
pub struct SuiteConfig {
    pub cores: usize,
    pub events: u64,
    pub queries: Vec<String>,
    /// Seconds of paced input for the latency measurement.
    pub latency_seconds: f64,
}

#[derive(Serialize, Debug)]
pub struct QueryFigures {
    pub events_per_s: f64,
    pub events_per_s_per_core: f64,
    /// Throughput as a fraction of the bare generator's (the baseline).
    pub generator_ratio: f64,
    pub latency_rate_events_per_s: u64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_p999: u64,
    pub latency_us_max: u64,
}

#[derive(Serialize, Debug)]
pub struct SuiteReport {
    pub cores: usize,
    pub machine: String,
    pub events: u64,
    pub generator_events_per_s: f64,
    pub queries: std::collections::BTreeMap<String, QueryFigures>,
}

/// Events per second of the bare generator on `cores` threads (the baseline).
pub fn generator_baseline(cores: usize, events: u64) -> f64 {
    let generator =
        Arc::new(Generator::new(GeneratorConfig::default()).expect("default config is valid"));
    let started = Instant::now();
    let threads: Vec<_> = dirigo_nexmark::split(events, cores.max(1))
        .into_iter()
        .map(|range| {
            let generator = generator.clone();
            std::thread::spawn(move || {
                let mut batch = Vec::with_capacity(1024);
                let mut n = range.start;
                let mut checksum = 0u64;
                while n < range.end {
                    let end = (n + 1024).min(range.end);
                    batch.clear();
                    generator.fill(n..end, &mut batch);
                    checksum = checksum.wrapping_add(batch.len() as u64);
                    n = end;
                }
                checksum
            })
        })
        .collect();
    let made: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    made as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

pub fn run_suite(config: &SuiteConfig) -> Result<SuiteReport, BenchError> {
    let machine = Machine::detect();
    let generator_events_per_s = generator_baseline(config.cores, config.events);
    let mut queries = std::collections::BTreeMap::new();
    for query in &config.queries {
        if !QUERIES.contains(&query.as_str()) {
            return Err(BenchError(format!(
                "unknown query {query:?}; the queries are {}",
                QUERIES.join(", ")
            )));
        }
        eprintln!(
            "bench nexmark: {query} at full speed over {} events",
            config.events
        );
        let full = run_query(&RunConfig {
            query: query.clone(),
            cores: config.cores,
            oversubscribe: false,
            source: EventSource::Generator {
                config: GeneratorConfig::default(),
                events: config.events,
            },
            output: Output::Null,
            sink_parallelism: config.cores as u32,
            rate_events_per_s: None,
            slo: Duration::from_millis(100),
            progress: None,
            time_limit: Duration::from_secs(600),
            checkpoints: None,
        })
        .map_err(BenchError)?;
        let rate = ((full.events_per_s / 2.0) as u64).max(1);
        let paced_events = ((rate as f64 * config.latency_seconds) as u64).max(1);
        eprintln!("bench nexmark: {query} paced at {rate} events/s for latency");
        let paced = run_query(&RunConfig {
            query: query.clone(),
            cores: config.cores,
            oversubscribe: false,
            source: EventSource::Generator {
                config: GeneratorConfig {
                    rate: dirigo_engine::dataflow::RateSchedule::constant(rate),
                    ..GeneratorConfig::default()
                },
                events: paced_events,
            },
            output: Output::Null,
            sink_parallelism: config.cores as u32,
            rate_events_per_s: Some(rate),
            slo: Duration::from_millis(100),
            progress: None,
            time_limit: Duration::from_secs(600),
            checkpoints: None,
        })
        .map_err(BenchError)?;
        queries.insert(
            query.clone(),
            QueryFigures {
                events_per_s: full.events_per_s,
                events_per_s_per_core: full.events_per_s_per_core,
                generator_ratio: full.events_per_s / generator_events_per_s.max(1e-9),
                latency_rate_events_per_s: rate,
                latency_us_p50: paced.latency_us.p50,
                latency_us_p99: paced.latency_us.p99,
                latency_us_p999: paced.latency_us.p999,
                latency_us_max: paced.latency_us.max,
            },
        );
    }
    Ok(SuiteReport {
        cores: config.cores,
        machine: machine.machine.clone(),
        events: config.events,
        generator_events_per_s,
        queries,
    })
}

//! What machine a figure was measured on: the CPU model and the cores this
//! process may use. Read once per report, outside every timed section.
//!
//! Reading `/proc/cpuinfo` is reporting, not the data path (where only `net`
//! and `storage` do I/O); it is here so that `dirigo run` and the benchmarks
//! name the machine alike.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model from `/proc/cpuinfo`, or "unknown".
    pub machine: String,
    /// Cores this process may run on.
    pub cores: usize,
}

impl Machine {
    pub fn detect() -> Self {
        Machine {
            machine: cpu_model().unwrap_or_else(|| "unknown".to_string()),
            cores: dirigo_engine::runtime::online_cores(),
        }
    }
}

fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
}

//! Results: latency statistics, process figures from /proc, the printed table.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

/// Latencies and outcomes of one scenario.
#[derive(Default)]
pub struct Recorder {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
}

impl Recorder {
    pub fn ok(&mut self, took: Duration) {
        self.latencies.push(took);
    }

    /// Count an error by status (0 = transport error).
    pub fn err(&mut self, status: u16) {
        let key = if status == 0 {
            "io".to_owned()
        } else {
            status.to_string()
        };
        *self.errors.entry(key).or_default() += 1;
    }

    pub fn record(&mut self, status: u16, took: Duration) {
        if (200..300).contains(&status) {
            self.ok(took);
        } else {
            self.err(status);
        }
    }

    pub fn merge(&mut self, other: Recorder) {
        self.latencies.extend(other.latencies);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    pub fn finish(
        mut self,
        name: &str,
        wall: Duration,
        before: Option<ProcStats>,
        after: Option<ProcStats>,
    ) -> ScenarioResult {
        self.latencies.sort();
        let count = self.latencies.len();
        let pct = |p: f64| -> f64 {
            if count == 0 {
                return 0.0;
            }
            let idx = ((p / 100.0) * count as f64).ceil() as usize;
            ms(self.latencies[idx.clamp(1, count) - 1])
        };
        ScenarioResult {
            name: name.to_owned(),
            count,
            errors: self.errors,
            wall_s: wall.as_secs_f64(),
            ops_per_s: if wall.as_secs_f64() > 0.0 {
                count as f64 / wall.as_secs_f64()
            } else {
                0.0
            },
            p50_ms: pct(50.0),
            p95_ms: pct(95.0),
            p99_ms: pct(99.0),
            max_ms: self.latencies.last().map(|d| ms(*d)).unwrap_or(0.0),
            extra: BTreeMap::new(),
            proc_before: before,
            proc_after: after,
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Serialize, Clone, Debug)]
pub struct ScenarioResult {
    pub name: String,
    pub count: usize,
    pub errors: BTreeMap<String, usize>,
    pub wall_s: f64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Scenario-specific figures (response bytes, first/last-tenth latencies, ...).
    pub extra: BTreeMap<String, f64>,
    pub proc_before: Option<ProcStats>,
    pub proc_after: Option<ProcStats>,
}

/// A server process's memory and CPU, from /proc.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct ProcStats {
    pub vm_rss_kb: u64,
    pub vm_hwm_kb: u64,
    pub cpu_s: f64,
}

pub fn proc_stats(pid: Option<u32>) -> Option<ProcStats> {
    let pid = pid?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/pid/stat: indexes 11 and 12 after ')'.
    let clk_tck = 100.0;
    Some(ProcStats {
        vm_rss_kb: field("VmRSS:"),
        vm_hwm_kb: field("VmHWM:"),
        cpu_s: (ticks(11) + ticks(12)) / clk_tck,
    })
}

#[derive(Serialize)]
pub struct Run {
    pub label: String,
    pub base_url: String,
    pub started_unix: u64,
    pub scenarios: Vec<ScenarioResult>,
    pub proc_end: Option<ProcStats>,
}

pub fn table(run: &Run) -> String {
    let mut out = format!("\n{} ({})\n", run.label, run.base_url);
    out.push_str(&format!(
        "{:<34} {:>7} {:>7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}\n",
        "scenario",
        "count",
        "errors",
        "wall_s",
        "ops/s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "rss_MiB",
        "cpu_s"
    ));
    for s in &run.scenarios {
        let errors: usize = s.errors.values().sum();
        let rss = s
            .proc_after
            .map(|p| p.vm_rss_kb as f64 / 1024.0)
            .unwrap_or(0.0);
        let cpu = match (s.proc_before, s.proc_after) {
            (Some(b), Some(a)) => a.cpu_s - b.cpu_s,
            _ => 0.0,
        };
        out.push_str(&format!(
            "{:<34} {:>7} {:>7} {:>9.2} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>8.2}\n",
            s.name,
            s.count,
            errors,
            s.wall_s,
            s.ops_per_s,
            s.p50_ms,
            s.p95_ms,
            s.p99_ms,
            s.max_ms,
            rss,
            cpu
        ));
        for (k, v) in &s.extra {
            out.push_str(&format!("    {k}: {v:.2}\n"));
        }
    }
    if let Some(p) = run.proc_end {
        out.push_str(&format!(
            "server at end: VmRSS {:.1} MiB, VmHWM {:.1} MiB, CPU {:.2} s\n",
            p.vm_rss_kb as f64 / 1024.0,
            p.vm_hwm_kb as f64 / 1024.0,
            p.cpu_s
        ));
    }
    out
}

//! Reading numbers off the running system: percentiles, Redis's own
//! counters and processes' memory.

use std::collections::{BTreeMap, HashMap};

/// p50, p99 and max of a sample, in the sample's unit.
pub fn percentiles(mut sample: Vec<f64>) -> (f64, f64, f64) {
    if sample.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    sample.sort_by(f64::total_cmp);
    let at = |q: f64| sample[((sample.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99), *sample.last().unwrap())
}

/// Calls per command from `INFO commandstats` (script-internal calls
/// included, as Redis counts them).
pub async fn command_calls(redis: &redis::Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect())
}

/// One field of `INFO <section>` as a number.
pub async fn info_number(redis: &redis::Client, section: &str, field: &str) -> anyhow::Result<u64> {
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg(section).query_async(&mut conn).await?;
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("INFO {section} has no {field}"))
}

pub async fn key_count(redis: &redis::Client) -> anyhow::Result<u64> {
    let mut conn = redis.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("DBSIZE").query_async(&mut conn).await?)
}

/// Peak (`VmHWM`) or current (`VmRSS`) resident memory of a process, in KiB.
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{field}:")))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_default()
}

/// Per-command call deltas between two snapshots, divided by `per`.
pub fn calls_per(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, per: f64) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(name, calls)| {
            (
                name.clone(),
                (calls - before.get(name).copied().unwrap_or(0)) as f64 / per,
            )
        })
        .filter(|(_, per_unit)| *per_unit > 0.0)
        .collect()
}

/// Clock ticks per second of `/proc/<pid>/stat`'s `utime` and `stime`
/// (`getconf CLK_TCK`, read once; 100 on every Linux we run on, and the
/// fallback when getconf is missing).
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

/// The fields of `/proc/<pid>/stat` after the command name: index 0 is the
/// state, 1 the parent pid, 11 `utime`, 12 `stime` (all threads, in ticks).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(
        rest.split_whitespace()
            .map(|field| field.parse().unwrap_or(0))
            .collect(),
    )
}

/// `pid` and all its descendants (a Celery worker's prefork children, a
/// Redis AOF rewrite), from the parent pids in /proc.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(parent) = stat_fields(child).and_then(|fields| fields.get(1).copied()) {
            children.entry(parent as u32).or_default().push(child);
        }
    }
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        tree.extend(children.get(&tree[next]).into_iter().flatten());
        next += 1;
    }
    tree
}

/// CPU time used so far (user + system, clock ticks) by each process of
/// named groups, each group being some processes and all their descendants.
pub struct CpuSample(Vec<(String, HashMap<u32, u64>)>);

pub fn cpu_sample(groups: &[(&str, Vec<u32>)]) -> CpuSample {
    CpuSample(
        groups
            .iter()
            .map(|(name, pids)| {
                let ticks = pids
                    .iter()
                    .flat_map(|pid| process_tree(*pid))
                    .filter_map(|pid| {
                        let fields = stat_fields(pid)?;
                        Some((pid, fields.get(11)? + fields.get(12)?))
                    })
                    .collect();
                (name.to_string(), ticks)
            })
            .collect(),
    )
}

/// Microseconds of CPU per `per` (e.g. per phase) of each group between two
/// samples, in the groups' order. A process born in between counts whole.
pub fn cpu_us_per(before: &CpuSample, after: &CpuSample, per: f64) -> Vec<(String, f64)> {
    let us_per_tick = 1e6 / clock_ticks_per_second() as f64;
    after
        .0
        .iter()
        .map(|(name, now)| {
            let then = before.0.iter().find(|(group, _)| group == name).map(|(_, ticks)| ticks);
            let ticks: u64 = now
                .iter()
                .map(|(pid, ticks)| ticks.saturating_sub(then.and_then(|then| then.get(pid)).copied().unwrap_or(0)))
                .sum();
            (name.clone(), ticks as f64 * us_per_tick / per)
        })
        .collect()
}

//! Reading numbers off the running system: percentiles, Redis's own
//! counters and processes' memory.

use std::collections::BTreeMap;

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

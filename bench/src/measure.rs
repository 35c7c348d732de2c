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
/// named groups, each group being some processes and all their descendants;
/// and the whole machine's, from `/proc/stat`.
pub struct CpuSample {
    groups: Vec<(String, HashMap<u32, u64>)>,
    machine: MachineTicks,
}

/// The machine's CPU time so far, all cores, in clock ticks: busy (user,
/// nice, system, irq, softirq, steal) and in all (busy, idle and iowait).
/// Busy time includes what no process is charged for, such as the kernel's
/// softirq work on loopback packets, which `/proc/<pid>/stat` leaves out.
#[derive(Clone, Copy, Default)]
struct MachineTicks {
    busy: u64,
    all: u64,
}

fn machine_ticks() -> MachineTicks {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
}

/// The machine's ticks from the text of `/proc/stat` (its `cpu ` line).
fn parse_machine_ticks(stat: &str) -> MachineTicks {
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return MachineTicks::default();
    };
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let field = |index: usize| fields.get(index).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    MachineTicks {
        busy,
        all: busy + field(3) + field(4),
    }
}

/// The group name under which [`cpu_us_per`] reports the whole machine.
pub const MACHINE: &str = "machine";

/// The share of the machine's CPU time (all cores) that was busy between
/// two samples, in percent: 100 is every core busy all the time.
pub fn machine_busy_percent(before: &CpuSample, after: &CpuSample) -> f64 {
    let all = after.machine.all.saturating_sub(before.machine.all);
    if all == 0 {
        return 0.0;
    }
    after.machine.busy.saturating_sub(before.machine.busy) as f64 * 100.0 / all as f64
}

pub fn cpu_sample(groups: &[(&str, Vec<u32>)]) -> CpuSample {
    let machine = machine_ticks();
    CpuSample {
        machine,
        groups: groups
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
    }
}

/// Microseconds of CPU per `per` (e.g. per phase) of each group between two
/// samples, in the groups' order, then the whole machine's busy time
/// (`machine`: every process, drivers and kernel work included). A process
/// born in between counts whole.
pub fn cpu_us_per(before: &CpuSample, after: &CpuSample, per: f64) -> Vec<(String, f64)> {
    let us_per_tick = 1e6 / clock_ticks_per_second() as f64;
    let machine = after.machine.busy.saturating_sub(before.machine.busy) as f64 * us_per_tick / per;
    after
        .groups
        .iter()
        .map(|(name, now)| {
            let then = before
                .groups
                .iter()
                .find(|(group, _)| group == name)
                .map(|(_, ticks)| ticks);
            let ticks: u64 = now
                .iter()
                .map(|(pid, ticks)| ticks.saturating_sub(then.and_then(|then| then.get(pid)).copied().unwrap_or(0)))
                .sum();
            (name.clone(), ticks as f64 * us_per_tick / per)
        })
        .chain(std::iter::once((MACHINE.to_string(), machine)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_count_softirq_and_steal_as_busy_and_iowait_as_not() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 2 30 500 7 1 11 3 40 0\ncpu0 50 1 15 250 3 0 5 1 20 0\n";
        let ticks = parse_machine_ticks(stat);
        assert_eq!(ticks.busy, 100 + 2 + 30 + 1 + 11 + 3);
        assert_eq!(ticks.all, ticks.busy + 500 + 7);
    }

    #[test]
    fn busy_percent_is_the_busy_share_between_two_samples() {
        let sample = |busy, all| CpuSample {
            groups: Vec::new(),
            machine: MachineTicks { busy, all },
        };
        assert_eq!(machine_busy_percent(&sample(100, 1000), &sample(250, 1200)), 75.0);
        assert_eq!(machine_busy_percent(&sample(100, 1000), &sample(100, 1000)), 0.0);
    }
}

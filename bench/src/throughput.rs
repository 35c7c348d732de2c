//! Throughput: six-phase workflows with an instant model against the
//! peers a user would otherwise pick (a BullMQ flow, a Celery chain with its
//! default acks and with `acks_late`), same count, same run, in every
//! `--fsync` mode, the median of `--repeat` runs for every number. Beside the
//! rate, each contender's CPU per phase (its own processes and Redis, from
//! /proc; the stand-in model and the load drivers excluded) and Redis
//! commands per phase (`INFO commandstats`). Every contender gets a fresh
//! Redis with the same settings, started for its run alone.

use crate::figures::{BenchStack, INSTANT_MODEL, breakdown, nexus_rate};
use crate::measure::{MACHINE, calls_per, command_calls, cpu_sample, cpu_us_per, info_number, machine_busy_percent};
use crate::peer::WarmPeer;
use crate::{Args, bullmq, celery};
use futures::future::BoxFuture;
use nexus_tests::RedisServer;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// Phases of a workflow, steps of a peer's chain.
const STEPS: usize = 6;

/// The goals of the issue "ahead of every peer in every mode" (printed, not
/// asserted: the numbers depend on the machine).
const GOAL_OVER_BULLMQ: f64 = 2.0;
const GOAL_OVER_CELERY: f64 = 20.0;
const GOAL_ENGINE_CPU_US: f64 = 150.0;

#[derive(Clone, Copy, PartialEq)]
enum Contender {
    Nexus,
    Bullmq,
    Celery,
    CeleryAcksLate,
}

impl Contender {
    /// Its key in the JSON and the key=value lines.
    fn key(self) -> &'static str {
        match self {
            Self::Nexus => "nexus",
            Self::Bullmq => "bullmq",
            Self::Celery => "celery",
            Self::CeleryAcksLate => "celery_acks_late",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Nexus => "nexus",
            Self::Bullmq => "bullmq",
            Self::Celery => "celery",
            Self::CeleryAcksLate => "celery acks_late",
        }
    }
}

/// One contender's numbers from one run (or the medians of several).
/// Process groups measured and printed but not part of the engine's total:
/// the stand-in model shares the machine, so its cost is shown, not hidden;
/// `machine` is all the machine's busy time (drivers, stand-in and kernel
/// work no process is charged for included), which tells whether the run
/// was bound by the CPU.
const NOT_ENGINE: &[&str] = &["stand_in", MACHINE];

#[derive(Clone)]
struct Measured {
    per_second: f64,
    seconds: f64,
    /// µs of CPU per phase (per chain step for the peers) by process group.
    cpu: Vec<(String, f64)>,
    cpu_total: f64,
    /// Redis commands per phase (per step) by command.
    commands: BTreeMap<String, f64>,
    commands_total: f64,
    /// How busy the machine's cores were over the run, in percent of all.
    machine_busy_percent: f64,
    /// What the contender reported about itself (versions, settings).
    about: Value,
}

impl Measured {
    fn new(
        per_second: f64,
        seconds: f64,
        cpu: Vec<(String, f64)>,
        machine_busy_percent: f64,
        commands: BTreeMap<String, f64>,
        about: Value,
    ) -> Self {
        Self {
            per_second,
            seconds,
            cpu_total: cpu
                .iter()
                .filter(|(group, _)| !NOT_ENGINE.contains(&group.as_str()))
                .map(|(_, us)| us)
                .sum(),
            cpu,
            commands_total: commands.values().sum(),
            commands,
            machine_busy_percent,
            about,
        }
    }

    /// The median of every number over the runs.
    fn median(runs: &[Measured]) -> Measured {
        let of = |value: &dyn Fn(&Measured) -> f64| median(runs.iter().map(value).collect());
        let cpu = runs[0]
            .cpu
            .iter()
            .map(|(group, _)| (group.clone(), of(&|run| lookup(&run.cpu, group))))
            .collect();
        let names: std::collections::BTreeSet<&String> = runs.iter().flat_map(|run| run.commands.keys()).collect();
        let commands = names
            .into_iter()
            .map(|name| {
                let per = of(&|run| run.commands.get(name).copied().unwrap_or(0.0));
                (name.clone(), per)
            })
            .collect();
        Measured {
            per_second: of(&|run| run.per_second),
            seconds: of(&|run| run.seconds),
            cpu,
            cpu_total: of(&|run| run.cpu_total),
            commands,
            commands_total: of(&|run| run.commands_total),
            machine_busy_percent: of(&|run| run.machine_busy_percent),
            about: runs[0].about.clone(),
        }
    }

    fn json(&self) -> Value {
        let cpu: Map<String, Value> = std::iter::once(("total".to_string(), json!(self.cpu_total)))
            .chain(self.cpu.iter().map(|(group, us)| (group.clone(), json!(us))))
            .collect();
        json!({"per_second": self.per_second, "seconds": self.seconds, "cpu_us_per_phase": cpu,
               "redis_commands_per_phase": self.commands_total, "redis_calls_per_phase": self.commands,
               "machine_busy_percent": self.machine_busy_percent, "about": self.about})
    }
}

fn lookup(pairs: &[(String, f64)], name: &str) -> f64 {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| *value)
        .unwrap_or(0.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

pub fn throughput(args: Args) -> BoxFuture<'static, anyhow::Result<Value>> {
    Box::pin(async move {
        // --quick: enough for every line to mean something, few enough that
        // CI's debug build runs all four contenders in both modes quickly.
        let runs = args.workflows.unwrap_or(args.count(2_000, 60));
        let warmup = args.count(200, 10);
        let repeat = args.repeat();
        let contenders = available_contenders(&args).await;
        let mut modes = Map::new();
        for fsync in &args.fsync {
            let mut measured: Vec<(Contender, Vec<Measured>)> = contenders.iter().map(|c| (*c, Vec::new())).collect();
            let mut failures: Map<String, Value> = Map::new();
            for run in 1..=repeat {
                let mut line = Vec::new();
                for (contender, results) in &mut measured {
                    match measure(*contender, fsync, runs, warmup).await {
                        Ok(result) => {
                            line.push(format!("{} {:.0}/s", contender.label(), result.per_second));
                            results.push(result);
                        }
                        // Nexus failing is the bench failing; a peer failing is
                        // reported and left out.
                        Err(error) if *contender == Contender::Nexus => return Err(error),
                        Err(error) => {
                            println!(
                                "throughput [fsync {fsync}] run {run}/{repeat}: {} failed: {error:#}",
                                contender.label()
                            );
                            line.push(format!("{} failed", contender.label()));
                            failures
                                .entry(contender.key())
                                .or_insert_with(|| json!([]))
                                .as_array_mut()
                                .unwrap()
                                .push(json!(format!("{error:#}")));
                        }
                    }
                }
                println!("throughput [fsync {fsync}] run {run}/{repeat}: {}", line.join(", "));
            }
            let medians: Vec<(Contender, Measured, Vec<Measured>)> = measured
                .into_iter()
                .filter(|(_, results)| !results.is_empty())
                .map(|(contender, results)| (contender, Measured::median(&results), results))
                .collect();
            let mode = report(fsync, runs, warmup, repeat, &medians);
            let mut mode = mode;
            mode["failures"] = Value::Object(failures);
            modes.insert(fsync.clone(), mode);
        }
        Ok(
            json!({"workflows": runs, "warmup": warmup, "repeat": repeat, "steps": STEPS,
                  "clock_ticks_per_second": crate::measure::clock_ticks_per_second(),
                  "contenders": contenders.iter().map(|c| c.key()).collect::<Vec<_>>(), "modes": modes}),
        )
    })
}

/// Nexus, and each peer whose setup works (else a line saying why not).
async fn available_contenders(args: &Args) -> Vec<Contender> {
    let mut contenders = vec![Contender::Nexus];
    if args.skip_bullmq {
        println!("throughput: bullmq skipped (--skip-bullmq)");
    } else {
        match bullmq::setup().await {
            Ok(()) => contenders.push(Contender::Bullmq),
            Err(error) => println!("throughput: bullmq skipped ({error:#})"),
        }
    }
    if args.skip_celery {
        println!("throughput: celery skipped (--skip-celery)");
    } else {
        match celery::setup().await {
            Ok(()) => contenders.extend([Contender::Celery, Contender::CeleryAcksLate]),
            Err(error) => println!("throughput: celery skipped ({error:#})"),
        }
    }
    contenders
}

/// One run of one contender on a fresh Redis (and, for Nexus, a fresh stack).
async fn measure(contender: Contender, fsync: &str, runs: usize, warmup: usize) -> anyhow::Result<Measured> {
    if contender == Contender::Nexus {
        let stack = BenchStack::start_in(fsync, 1, INSTANT_MODEL, &[("NEXUS_WORKER_MAX_IN_FLIGHT", "100")]);
        let rate = nexus_rate(&stack, runs, warmup).await?;
        let about = json!({"orchestrators": 1, "workers": stack.workers.len(),
                           "redis_bytes_per_finished_workflow": rate.bytes_per_workflow});
        return Ok(Measured::new(
            rate.rate,
            rate.seconds,
            rate.cpu_us_per_phase,
            rate.machine_busy_percent,
            rate.commands_per_phase,
            about,
        ));
    }
    let redis = RedisServer::start_with(&["--appendfsync", fsync]);
    let url = format!("{}/0", redis.url());
    let peer = match contender {
        Contender::Bullmq => bullmq::start(&url, runs, warmup).await?,
        Contender::Celery => celery::start(&url, runs, warmup, false).await?,
        _ => celery::start(&url, runs, warmup, true).await?,
    };
    timed_peer_run(&redis, peer, runs).await
}

/// Reads the peer's workers' and Redis's CPU and Redis's command counts
/// around the driver's timed run.
async fn timed_peer_run(redis: &RedisServer, mut peer: WarmPeer, chains: usize) -> anyhow::Result<Measured> {
    let client = redis.client();
    let redis_pid = info_number(&client, "server", "process_id").await? as u32;
    let groups = [("workers", peer.worker_pids.clone()), ("redis", vec![redis_pid])];
    let calls_before = command_calls(&client).await?;
    let cpu_before = cpu_sample(&groups);
    peer.driver.send("go").await?;
    let mut result = peer.driver.next_json(Duration::from_secs(900)).await?;
    let cpu_after = cpu_sample(&groups);
    let calls_after = command_calls(&client).await?;
    result.as_object_mut().unwrap().append(&mut peer.about);
    peer.finish().await;
    let per_second = result["chains_per_sec"]
        .as_f64()
        .or_else(|| result["chains_per_second"].as_f64())
        .ok_or_else(|| anyhow::anyhow!("no rate in the peer's result: {result}"))?;
    let seconds = result["seconds"].as_f64().unwrap_or_default();
    let steps = (chains * STEPS) as f64;
    Ok(Measured::new(
        per_second,
        seconds,
        cpu_us_per(&cpu_before, &cpu_after, steps),
        machine_busy_percent(&cpu_before, &cpu_after),
        calls_per(&calls_before, &calls_after, steps),
        result,
    ))
}

/// Prints a mode's table and key=value lines; returns its JSON.
fn report(
    fsync: &str,
    runs: usize,
    warmup: usize,
    repeat: usize,
    medians: &[(Contender, Measured, Vec<Measured>)],
) -> Value {
    let nexus = medians
        .iter()
        .find(|(contender, ..)| *contender == Contender::Nexus)
        .map(|(_, measured, _)| measured.clone());
    let ratio = |peer: &Measured| nexus.as_ref().map(|nexus| nexus.per_second / peer.per_second);
    println!(
        "throughput, fsync {fsync}: {runs} six-step workflows/chains per contender after {warmup} untimed, median of {repeat} run(s)"
    );
    println!(
        "  {:<18} {:>12} {:>11} {:>14} {:>18}",
        "contender", "per second", "nexus / it", "cpu us/phase", "redis cmds/phase"
    );
    for (contender, measured, _) in medians {
        let times = match (contender, ratio(measured)) {
            (Contender::Nexus, _) | (_, None) => "-".to_string(),
            (_, Some(ratio)) => format!("{ratio:.1}x"),
        };
        println!(
            "  {:<18} {:>12.1} {:>11} {:>14.1} {:>18.1}",
            contender.label(),
            measured.per_second,
            times,
            measured.cpu_total,
            measured.commands_total
        );
    }
    let find = |wanted: Contender| medians.iter().find(|(c, ..)| *c == wanted).map(|(_, m, _)| m);
    let mut goals = Vec::new();
    for (peer, goal) in [
        (Contender::Bullmq, GOAL_OVER_BULLMQ),
        (Contender::Celery, GOAL_OVER_CELERY),
    ] {
        if let Some(times) = find(peer).and_then(ratio) {
            goals.push(format!(
                "nexus / {} {times:.1}x (goal >= {goal}x: {})",
                peer.label(),
                met(times >= goal)
            ));
        }
    }
    if let Some(nexus) = &nexus {
        goals.push(format!(
            "engine cpu {:.1} us/phase (goal <= {GOAL_ENGINE_CPU_US}: {})",
            nexus.cpu_total,
            met(nexus.cpu_total <= GOAL_ENGINE_CPU_US)
        ));
    }
    println!("throughput goals [fsync {fsync}]: {}", goals.join("; "));
    for (contender, measured, _) in medians {
        let split: Vec<String> = measured
            .cpu
            .iter()
            .map(|(group, us)| format!("{group}={us:.1}"))
            .collect();
        println!(
            "cpu_per_phase_us {} total={:.1} {} machine_busy={:.0}% fsync={fsync}",
            contender.key(),
            measured.cpu_total,
            split.join(" "),
            measured.machine_busy_percent
        );
    }
    for (contender, measured, _) in medians {
        println!(
            "redis_commands_per_phase {} total={:.1} fsync={fsync}: {}",
            contender.key(),
            measured.commands_total,
            breakdown(&measured.commands)
        );
    }
    let mut mode = Map::new();
    let mut ratios = Map::new();
    for (contender, measured, all) in medians {
        let mut entry = measured.json();
        entry["runs"] = Value::Array(all.iter().map(Measured::json).collect());
        mode.insert(contender.key().to_string(), entry);
        if *contender != Contender::Nexus
            && let Some(times) = ratio(measured)
        {
            ratios.insert(contender.key().to_string(), json!(times));
        }
    }
    mode.insert("nexus_over".into(), Value::Object(ratios));
    Value::Object(mode)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

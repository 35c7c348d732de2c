//! The figures. Each starts its own stack, drives it, prints one line per
//! number and returns the numbers as JSON.

use crate::Args;
use crate::drive::{clients, completed, completed_runs, start_many, unix_now, wait_all, wait_ended_in_redis};
use crate::measure::{
    MACHINE, calls_per, command_calls, cpu_sample, cpu_us_per, info_number, key_count, machine_busy_percent,
    memory_kib, percentiles,
};
use futures::future::BoxFuture;
use nexus_tests::{ModelControl, Orchestrator, RedisServer, StandIn, Worker};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type Figure = fn(Args) -> BoxFuture<'static, anyhow::Result<Value>>;

/// A model that answers at once with a few words.
pub const INSTANT_MODEL: &[&str] = &[
    "--first-token-latency-ms",
    "0",
    "--tokens-per-second",
    "0",
    "--reply-words",
    "8",
];

/// Redis, the stand-in, one orchestrator and `workers` workers.
pub struct BenchStack {
    pub redis: RedisServer,
    pub model: StandIn,
    pub orchestrator: Orchestrator,
    pub workers: Vec<Worker>,
}

impl BenchStack {
    /// With Redis's fsync policy the first of `--fsync` (the figures other
    /// than throughput run in one mode).
    fn start(args: &Args, workers: usize, model_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_in(args.primary_fsync(), workers, model_args, env)
    }

    /// Every Nexus process runs on one thread (`NEXUS_THREADS=1`): on this
    /// 2-core machine it shares the cores with Redis, the stand-in and the
    /// load driver, and BullMQ's workers are single-threaded Node too. The
    /// response cache is off (the harness's default): the stand-in's short
    /// answers make later phases of different runs identical requests, and a
    /// hit would measure the cache, not the engine.
    pub fn start_in(fsync: &str, workers: usize, model_args: &[&str], env: &[(&str, &str)]) -> Self {
        let env: Vec<(&str, &str)> = std::iter::once(("NEXUS_THREADS", "1"))
            .chain(env.iter().copied())
            .collect();
        let env = env.as_slice();
        let redis = RedisServer::start_with(&["--appendfsync", fsync]);
        let model = StandIn::start(model_args);
        let orchestrator = Orchestrator::start(&redis.url(), env);
        let workers = (0..workers)
            .map(|_| Worker::start(&redis.url(), &model.base_url(), env))
            .collect();
        Self {
            redis,
            model,
            orchestrator,
            workers,
        }
    }
}

/// Hop overhead: from the stand-in finishing phase N's answer to phase N+1's
/// request arriving there, per workflow (the `traceparent` header names the
/// workflow). This includes the worker publishing the result, the
/// orchestrator applying it and queuing the next task, and a worker claiming
/// and starting it: slightly more than result-published-to-next-request.
pub fn hop_overhead(args: Args) -> BoxFuture<'static, anyhow::Result<Value>> {
    Box::pin(async move {
        let workflows = args.count(2_000, 100);
        let stack = BenchStack::start(&args, 1, INSTANT_MODEL, &[]);
        let redis = stack.redis.client();
        let clients = clients(&stack.orchestrator.endpoint(), 4).await;
        let before = command_calls(&redis).await?;
        let (workflows, published) = run_closed_loop(&clients, workflows, args.hop_concurrency).await;
        let after = command_calls(&redis).await?;
        let requests = ModelControl::new(&stack.model.base_url()).requests().await;
        let hops = hop_latencies_us(&requests);
        let (p50, p99, max) = percentiles(hops.iter().map(|us| *us as f64 / 1000.0).collect());
        let engine_hops = published_to_next_request_us(&requests, &published);
        let (e50, e99, emax) = percentiles(engine_hops.iter().map(|us| *us as f64 / 1000.0).collect());
        let phases = (workflows * 6) as f64;
        let per_phase = calls_per(&before, &after, phases);
        let commands: f64 = per_phase.values().sum();
        println!(
            "hop overhead (result published -> next model request): p50 {e50:.2} ms, p99 {e99:.2} ms, max {emax:.2} ms over {} hops ({} workflows in flight)",
            engine_hops.len(),
            args.hop_concurrency
        );
        println!(
            "hop overhead (model answer done -> next model request): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms over {} hops",
            hops.len()
        );
        println!(
            "redis commands per phase hop: {commands:.1} (incl. inside scripts): {}",
            breakdown(&per_phase)
        );
        Ok(
            json!({"hops": engine_hops.len(), "in_flight": args.hop_concurrency, "p50_ms": e50, "p99_ms": e99, "max_ms": emax,
                  "answer_to_request": {"p50_ms": p50, "p99_ms": p99, "max_ms": max},
                  "redis_commands_per_phase": commands, "redis_calls_per_phase": per_phase}),
        )
    })
}

/// When each phase's result was published, by trace id (the workflow's
/// UUID), in phase order.
type Published = HashMap<String, Vec<u64>>;

/// Runs `count` workflows, `lanes` at a time, each lane starting the next
/// once its previous one's watch stream ended. Returns how many ran and when
/// their results were published (from the phase-completed events).
async fn run_closed_loop(clients: &[nexus_tests::Client], count: usize, lanes: usize) -> (usize, Published) {
    let per_lane = count.div_ceil(lanes);
    let runs = (0..lanes).map(|lane| {
        let mut client = clients[lane % clients.len()].clone();
        tokio::spawn(async move {
            let mut published = Published::new();
            for n in 0..per_lane {
                let id = nexus_tests::start(&mut client, &format!("Hop {lane}-{n}")).await;
                let events = nexus_tests::watch_until_end(&mut client, &id, "", Duration::from_secs(60)).await;
                let trace = id.rsplit('_').next().unwrap_or_default().to_string();
                published.insert(trace, events.iter().filter_map(published_us).collect());
            }
            published
        })
    });
    let published = futures::future::join_all(runs)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    (per_lane * lanes, published)
}

fn published_us(event: &nexus_proto::v1::WorkflowEvent) -> Option<u64> {
    match &event.kind {
        Some(nexus_proto::v1::workflow_event::Kind::PhaseCompleted(done)) => {
            let at = done.result_published_at?;
            Some(at.seconds as u64 * 1_000_000 + at.nanos as u64 / 1000)
        }
        _ => None,
    }
}

/// The eight commands called most, most first: "evalsha 3.30, xack 1.00, …".
pub fn breakdown(per_phase: &BTreeMap<String, f64>) -> String {
    let mut top: Vec<_> = per_phase.iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(a.1));
    top.iter()
        .take(8)
        .map(|(name, n)| format!("{name} {n:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The trace id (the workflow's UUID) of a request in the stand-in's log.
fn trace_of(request: &Value) -> &str {
    request["traceparent"]
        .as_str()
        .unwrap_or_default()
        .split('-')
        .nth(1)
        .unwrap_or_default()
}

/// From each phase's result being published to the next phase's request
/// arriving at the stand-in, per workflow.
fn published_to_next_request_us(requests: &[Value], published: &Published) -> Vec<u64> {
    let mut received: HashMap<&str, Vec<u64>> = HashMap::new();
    for request in requests {
        let trace = trace_of(request);
        received
            .entry(trace)
            .or_default()
            .push(request["received_us"].as_u64().unwrap_or(0));
    }
    let mut hops = Vec::new();
    for (trace, mut arrivals) in received {
        arrivals.sort();
        let Some(results) = published.get(trace) else { continue };
        for (result, next) in results.iter().zip(arrivals.iter().skip(1)) {
            hops.push(next.saturating_sub(*result));
        }
    }
    hops
}

/// Gaps between one request's end and the next request of the same trace.
fn hop_latencies_us(requests: &[Value]) -> Vec<u64> {
    let mut by_trace: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for request in requests {
        let trace = trace_of(request);
        let times = (
            request["received_us"].as_u64().unwrap_or(0),
            request["finished_us"].as_u64().unwrap_or(0),
        );
        by_trace.entry(trace).or_default().push(times);
    }
    by_trace
        .into_values()
        .flat_map(|mut calls| {
            calls.sort();
            calls
                .windows(2)
                .filter(|pair| pair[0].1 > 0)
                .map(|pair| pair[1].0.saturating_sub(pair[0].1))
                .collect::<Vec<_>>()
        })
        .collect()
}

pub struct Rate {
    pub rate: f64,
    pub seconds: f64,
    pub bytes_per_workflow: f64,
    /// CPU of the engine's processes (orchestrator, worker(s), Redis) over
    /// the timed window, in µs per phase, in that order.
    pub cpu_us_per_phase: Vec<(String, f64)>,
    /// Redis commands per phase over the timed window (script-internal
    /// calls included, and the load driver's own starts and polls).
    pub commands_per_phase: BTreeMap<String, f64>,
    /// How busy the machine's cores were over the timed window, in percent.
    pub machine_busy_percent: f64,
}

/// `runs` six-phase workflows, 32 starts in flight, after `warmup` untimed
/// ones; the time runs from the first start to the last completion as the
/// orchestrator recorded it.
pub async fn nexus_rate(stack: &BenchStack, runs: usize, warmup: usize) -> anyhow::Result<Rate> {
    let redis = stack.redis.client();
    let clients = clients(&stack.orchestrator.endpoint(), 4).await;
    if warmup > 0 {
        let (ids, _) = start_many(&clients, warmup, 32).await;
        let finished = wait_all(&clients[0], &ids, Duration::from_secs(600)).await;
        anyhow::ensure!(completed(&finished) == warmup, "warm-up workflows failed");
    }
    let redis_pid = info_number(&redis, "server", "process_id").await? as u32;
    let worker = if stack.workers.len() == 1 { "worker" } else { "workers" };
    let groups = [
        ("orchestrator", vec![stack.orchestrator.process.pid()]),
        (
            worker,
            stack.workers.iter().map(|worker| worker.process.pid()).collect(),
        ),
        ("redis", vec![redis_pid]),
        ("stand_in", vec![stack.model.process.pid()]),
    ];
    let memory_before = info_number(&redis, "memory", "used_memory").await?;
    let calls_before = command_calls(&redis).await?;
    let cpu_before = cpu_sample(&groups);
    let began = unix_now();
    let (ids, _) = start_many(&clients, runs, 32).await;
    wait_ended_in_redis(&redis, &ids, Duration::from_secs(600)).await?;
    let cpu_after = cpu_sample(&groups);
    let calls_after = command_calls(&redis).await?;
    // Read through the API only now, outside the measured window: every run
    // has ended, so this is one GetWorkflow each.
    let (_, seconds) = completed_runs(&clients[0], &ids, began, Duration::from_secs(600)).await?;
    let memory_after = info_number(&redis, "memory", "used_memory").await?;
    let bytes_per_workflow = memory_after.saturating_sub(memory_before) as f64 / runs as f64;
    let phases = (runs * 6) as f64;
    Ok(Rate {
        rate: runs as f64 / seconds,
        seconds,
        bytes_per_workflow,
        cpu_us_per_phase: cpu_us_per(&cpu_before, &cpu_after, phases),
        commands_per_phase: calls_per(&calls_before, &calls_after, phases),
        machine_busy_percent: machine_busy_percent(&cpu_before, &cpu_after),
    })
}

/// In-flight capacity: many workflows at once with a 1 s model, one worker,
/// timed; then the worker's memory per call, with calls held open.
pub fn in_flight(args: Args) -> BoxFuture<'static, anyhow::Result<Value>> {
    Box::pin(async move {
        let runs = args.count(10_000, 300);
        let mut timed = timed_in_flight(&args, runs).await?;
        let (open, per_call) = held_calls_memory(&args, runs).await?;
        println!(
            "in-flight: {open} model calls held open at once on one worker: worker RSS growth {per_call:.0} bytes per call in flight (goal <= 10240)"
        );
        timed["held_calls_open"] = json!(open);
        timed["worker_bytes_per_call_in_flight"] = json!(per_call);
        Ok(timed)
    })
}

/// Redis, a stand-in serving HTTP/2 over TLS as OpenRouter does (every call
/// a stream of a few connections, not 10,000 HTTP/1.1 connections) with
/// `model` timing, an orchestrator and one worker allowed 20,000 calls.
struct InFlightStack {
    redis: RedisServer,
    model: nexus_tests::TlsStandIn,
    orchestrator: Orchestrator,
    worker: Worker,
}

impl InFlightStack {
    fn start(args: &Args, first_token_ms: &str) -> Self {
        let model = [
            "--first-token-latency-ms",
            first_token_ms,
            "--tokens-per-second",
            "0",
            "--reply-words",
            "8",
        ];
        let redis = RedisServer::start_with(&["--appendfsync", args.primary_fsync()]);
        let model = StandIn::start_tls(&model);
        let cert = model.cert.to_string_lossy().into_owned();
        let env = [
            ("NEXUS_THREADS", "1"),
            ("NEXUS_WORKER_MAX_IN_FLIGHT", "20000"),
            ("NEXUS_MODEL_CA_FILE", cert.as_str()),
        ];
        let orchestrator = Orchestrator::start(&redis.url(), &env[..1]);
        let worker = Worker::start(&redis.url(), &model.base_url(), &env);
        Self {
            redis,
            model,
            orchestrator,
            worker,
        }
    }
}

/// `runs` workflows of six 1 s calls: how long until all have ended (ideal
/// 6 s), and the peak memory of worker and orchestrator.
async fn timed_in_flight(args: &Args, runs: usize) -> anyhow::Result<Value> {
    let stack = InFlightStack::start(args, "1000");
    let clients = clients(&stack.orchestrator.endpoint(), 8).await;
    let began = unix_now();
    let started = Instant::now();
    let (ids, _) = start_many(&clients, runs, 64).await;
    let accepted_in = started.elapsed().as_secs_f64();
    // Waited for in Redis, so no GetWorkflow polls share the machine with
    // the run; read through the API once all have ended.
    wait_ended_in_redis(&stack.redis.client(), &ids, Duration::from_secs(900)).await?;
    let (_, seconds) = completed_runs(&clients[0], &ids, began, Duration::from_secs(900)).await?;
    let worker_peak = memory_kib(stack.worker.process.pid(), "VmHWM");
    let orchestrator_peak = memory_kib(stack.orchestrator.process.pid(), "VmHWM");
    // How many calls the stand-in had open at once: on a machine whose CPU
    // is the limit, far fewer than the runs in flight.
    let control = ModelControl::trusting(&stack.model.base_url(), &stack.model.cert);
    let (_, peak_calls) = control.request_counts().await;
    println!(
        "in-flight: {runs} workflows with a 1 s model (HTTP/2 over TLS) on one worker done in {seconds:.1} s (ideal 6 s, {:.2}x; all accepted in {accepted_in:.1} s); at most {peak_calls} model calls open at once",
        seconds / 6.0
    );
    println!(
        "in-flight: peak RSS worker {} MiB, orchestrator {} MiB",
        worker_peak / 1024,
        orchestrator_peak / 1024
    );
    Ok(
        json!({"workflows": runs, "seconds": seconds, "ideal_seconds": 6.0, "accepted_seconds": accepted_in,
              "worker_peak_rss_kib": worker_peak, "orchestrator_peak_rss_kib": orchestrator_peak,
              "peak_calls_open": peak_calls}),
    )
}

/// The worker's memory per call in flight: `runs` workflows on a model that
/// holds each call 30 s, longer than the starts take, so that every run's
/// first call is open at once; the worker's RSS growth then, divided by the
/// calls the stand-in counts open. (In the timed run the CPU limits how many
/// calls are open at once, while the worker also holds the runs between
/// calls, so its peak divided by either count says little.) The stack is
/// stopped with the calls still open.
async fn held_calls_memory(args: &Args, runs: usize) -> anyhow::Result<(u64, f64)> {
    let stack = InFlightStack::start(args, "30000");
    let worker_pid = stack.worker.process.pid();
    let idle_kib = memory_kib(worker_pid, "VmRSS");
    let clients = clients(&stack.orchestrator.endpoint(), 8).await;
    start_many(&clients, runs, 64).await;
    let control = ModelControl::trusting(&stack.model.base_url(), &stack.model.cert);
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut open = 0;
    while (open as usize) < runs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        open = control.request_counts().await.0;
    }
    anyhow::ensure!(open > 0, "no model call was open");
    let growth = memory_kib(worker_pid, "VmRSS").saturating_sub(idle_kib) as f64 * 1024.0;
    Ok((open, growth / open as f64))
}

/// Watcher fan-out: many concurrent WatchWorkflow streams on one
/// orchestrator over a few HTTP/2 connections; latency from an event's
/// creation (its `time`) to its arrival at the watcher.
pub fn watchers(args: Args) -> BoxFuture<'static, anyhow::Result<Value>> {
    Box::pin(async move {
        // Two shapes of the same 10,000 streams: many watchers per workflow
        // (one read serves them all), and the worst case, one watcher on
        // each of 10,000 different workflows (no sharing at all).
        let shapes = if args.quick {
            [(50, 4), (200, 1)]
        } else {
            [(1_000, 10), (10_000, 1)]
        };
        let mut results = Vec::new();
        for (workflows, per_workflow) in shapes {
            results.push(watch_fan_out(&args, workflows, per_workflow).await?);
        }
        Ok(json!({"shapes": results}))
    })
}

/// `workflows` workflows with `per_workflow` concurrent watch streams each.
async fn watch_fan_out(args: &Args, workflows: usize, per_workflow: usize) -> anyhow::Result<Value> {
    let model = [
        "--first-token-latency-ms",
        "3000",
        "--tokens-per-second",
        "20",
        "--reply-words",
        "10",
    ];
    let stack = BenchStack::start(args, 1, &model, &[]);
    let clients = clients(&stack.orchestrator.endpoint(), 16).await;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let redis_pid = info_number(&stack.redis.client(), "server", "process_id").await? as u32;
    let groups = [
        ("orchestrator", vec![stack.orchestrator.process.pid()]),
        ("worker", stack.workers.iter().map(|w| w.process.pid()).collect()),
        ("redis", vec![redis_pid]),
        ("stand-in", vec![stack.model.process.pid()]),
        ("this client", vec![std::process::id()]),
    ];
    let cpu_before = cpu_sample(&groups);
    let began = Instant::now();
    // Started in waves, as real traffic arrives, not all in one instant:
    // a thousand workflows in lock-step make every phase a burst.
    let mut watches = Vec::new();
    for _ in 0..WATCH_WAVES {
        let (ids, _) = start_many(&clients, workflows / WATCH_WAVES, 32).await;
        for (n, id) in ids
            .iter()
            .flat_map(|id| std::iter::repeat_n(id, per_workflow))
            .enumerate()
        {
            let client = clients[n % clients.len()].clone();
            watches.push(tokio::spawn(watch_one(client, id.clone(), latencies.clone())));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let connected_clients = sample_connected_clients(&stack.redis.client()).await?;
    futures::future::join_all(watches).await;
    let cpu = client_alone(cpu_us_per(
        &cpu_before,
        &cpu_sample(&groups),
        began.elapsed().as_secs_f64() * 1e4,
    ));
    let deliveries: Vec<Delivery> = std::mem::take(&mut *latencies.lock().unwrap());
    let sample: Vec<f64> = deliveries.iter().map(|d| d.total_us as f64 / 1000.0).collect();
    let (p50, p99, max) = percentiles(sample.clone());
    let (stored_p50, stored_p99, _) = percentiles(
        deliveries
            .iter()
            .map(|d| d.stored_to_received_us as f64 / 1000.0)
            .collect(),
    );
    let streams = workflows * per_workflow;
    println!(
        "watchers: {streams} concurrent streams on {workflows} workflows ({per_workflow} each) over {} connections, {} live events delivered: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
        clients.len(),
        sample.len()
    );
    println!(
        "watchers: of which stored in Redis -> received (from the event's stream id): p50 {stored_p50:.1} ms, p99 {stored_p99:.1} ms (the rest: created -> stored, the writing script waiting its turn)"
    );
    let shares: Vec<String> = cpu
        .iter()
        .map(|(name, percent)| format!("{name} {percent:.0}%"))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "watchers: CPU over the run, % of one core: {} (of {}% on {cores} cores)",
        shares.join(", "),
        cores * 100
    );
    println!("watchers: redis connected_clients during the run: {connected_clients} (not one per watcher)");
    Ok(
        json!({"streams": streams, "workflows": workflows, "per_workflow": per_workflow, "connections": clients.len(),
              "events": sample.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max,
              "stored_to_received_p50_ms": stored_p50, "stored_to_received_p99_ms": stored_p99,
              "redis_connected_clients": connected_clients,
              "cpu_percent_of_a_core": cpu.iter().map(|(name, percent)| (name.clone(), json!(percent))).collect::<serde_json::Map<_, _>>()}),
    )
}

/// A group's CPU counts its descendants, and the engine's processes are
/// the bench client's children: the client's own share is its group's
/// less the other processes' (the machine's total is not a process group).
fn client_alone(mut cpu: Vec<(String, f64)>) -> Vec<(String, f64)> {
    const CLIENT: &str = "this client";
    let others: f64 = cpu
        .iter()
        .filter(|(name, _)| name != CLIENT && name != MACHINE)
        .map(|(_, share)| share)
        .sum();
    if let Some((_, client)) = cpu.iter_mut().find(|(name, _)| name == CLIENT) {
        *client = (*client - others).max(0.0);
    }
    cpu
}

/// Waves in which the watched workflows are started.
const WATCH_WAVES: usize = 10;

/// One live event's way to its watcher: from its creation (the event's
/// `time`, set by the process that wrote it) and from its storing (the
/// millisecond in its Redis stream id, so up to 1 ms more) to its arrival.
/// The difference is the time its writer's script waited to run: behind
/// the writer's other work and behind Redis's other commands.
struct Delivery {
    total_us: u64,
    stored_to_received_us: u64,
}

/// Watches one workflow to its end, recording the delivery latency of every
/// event created after this stream was established (earlier ones are a
/// replay, not a live delivery).
async fn watch_one(mut client: nexus_tests::Client, id: String, latencies: Arc<Mutex<Vec<Delivery>>>) {
    let request = nexus_proto::v1::WatchWorkflowRequest {
        workflow_id: id,
        after_cursor: String::new(),
        ..Default::default()
    };
    let mut stream = client.watch_workflow(request).await.expect("watch").into_inner();
    let attached = unix_now();
    let mut mine = Vec::new();
    while let Ok(Some(event)) = stream.message().await {
        let received = unix_now();
        let Some(time) = event.time else { continue };
        let created = Duration::new(time.seconds as u64, time.nanos as u32);
        let stored_ms = event
            .cursor
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0);
        if created > attached {
            mine.push(Delivery {
                total_us: received.saturating_sub(created).as_micros() as u64,
                stored_to_received_us: received.saturating_sub(Duration::from_millis(stored_ms)).as_micros() as u64,
            });
        }
    }
    latencies.lock().unwrap().extend(mine);
}

async fn sample_connected_clients(redis: &redis::Client) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    info_number(redis, "clients", "connected_clients").await
}

/// Throughput with 1, 2 and 4 workers, and what retention does to Redis.
pub fn scaling(args: Args) -> BoxFuture<'static, anyhow::Result<Value>> {
    Box::pin(async move {
        let runs = args.count(2_000, 100);
        let mut curve = Vec::new();
        for workers in [1, 2, 4] {
            let stack = BenchStack::start(&args, workers, INSTANT_MODEL, &[]);
            let rate = nexus_rate(&stack, runs, 0).await?;
            println!(
                "scaling: {workers} worker(s): {:.0} workflows/s, redis {:.0} bytes per finished workflow",
                rate.rate, rate.bytes_per_workflow
            );
            curve.push(json!({"workers": workers, "per_second": rate.rate, "redis_bytes_per_workflow": rate.bytes_per_workflow}));
        }
        let retention = retention_check(&args, args.count(500, 50)).await?;
        Ok(json!({"curve": curve, "retention": retention}))
    })
}

/// Finished workflows expire after the retention period: keys and memory
/// return to the baseline of the shard's own streams and index.
async fn retention_check(args: &Args, runs: usize) -> anyhow::Result<Value> {
    let stack = BenchStack::start(args, 1, INSTANT_MODEL, &[("NEXUS_RETENTION_SECS", "10")]);
    let redis = stack.redis.client();
    let rate = nexus_rate(&stack, runs, 0).await?;
    let keys_finished = key_count(&redis).await?;
    let memory_finished = info_number(&redis, "memory", "used_memory").await?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let keys_expired = key_count(&redis).await?;
    let memory_expired = info_number(&redis, "memory", "used_memory").await?;
    println!(
        "retention: {runs} finished workflows ({:.0} bytes each) held {keys_finished} keys; after the 10 s retention {keys_expired} keys remain, memory {} KiB -> {} KiB",
        rate.bytes_per_workflow,
        memory_finished / 1024,
        memory_expired / 1024
    );
    Ok(
        json!({"workflows": runs, "keys_when_finished": keys_finished, "keys_after_retention": keys_expired,
              "used_memory_finished": memory_finished, "used_memory_after_retention": memory_expired}),
    )
}

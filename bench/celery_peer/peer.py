"""Celery peer of the Nexus throughput benchmark.

Measures what a user would get from the tool they would otherwise pick: a
Celery 5 chain of six no-op tasks per workflow, written as Celery's docs
advise (intermediate steps `ignore_result=True`, only the last step's
result stored), on Redis with the same settings as Nexus's (broker and
result backend), with a prefork worker of one process per core.

Run with the venv made by setup.sh:

    bench/.venv/bin/python bench/celery_peer/peer.py \
        --redis-url redis://127.0.0.1:6399/1 --chains 2000

stdout carries one JSON line, the result:
    {"chains": N, "tasks": 6N, "seconds": t, "chains_per_second": r,
     "concurrency": C, "acks_late": false, "warmup": W, "celery": "5.x.y"}
Everything else (progress, the worker's own output) goes to stderr.
With --handshake (how the Rust bench runs it, to read CPU and Redis
counters around exactly the timed window) stdout first carries
    {"warm": true, "worker_pid": P, "warmup_seconds": s}
after the warm-up; the peer then waits for a line on stdin before the
timed run and, after the result line, for another line (or the end of
stdin) before it stops the worker.
Exit status: 0 on success, 1 on failure (timeout, worker died, wrong
results, Redis unreachable), 2 on bad arguments, 128+signal when stopped
by SIGINT/SIGTERM/SIGHUP (the worker is stopped first).

Settings, and why (the goal is a typical, fair production setup):
  * prefork pool, concurrency = os.cpu_count(): Celery's default pool and
    the usual "one worker process per core" sizing.
  * worker_prefetch_multiplier = 4 (Celery's default; --prefetch-multiplier
    changes it). Each worker process reserves up to 4 messages, so the pool
    never waits on the broker. Celery's docs allow a higher value for short
    tasks, but 4 is what a user runs unless they tune, and it is not what
    holds Celery back here: on 2 cores, 1000 chains, 64 gave ~71 chains/s
    against ~69 for 4 (within noise; the per-task Redis round trips, each
    waiting for Redis's fsync, dominate), so the default is kept.
  * task_acks_late = False (default): ack when a task starts, so a task
    whose worker dies mid-run is lost. --acks-late sets task_acks_late=True:
    ack after the task ran, the at-least-once setting comparable to Nexus's
    (a phase is only acknowledged once its result is published).
  * Intermediate steps `ignore_result=True`, the last step's result stored
    (the idiomatic chain: a chain passes each result to the next step in
    the message, so only the final value needs the result backend; the
    caller waits on the chain's AsyncResult, i.e. the last step).
  * JSON serializer, gossip/mingle/heartbeat left on: all Celery defaults.
  * A short warm-up (--warmup chains, default 2 * concurrency, excluded
    from timing) so the pool's processes have opened their connections;
    --warmup 0 measures from a cold worker.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from celery import Celery, chain
from celery import __version__ as CELERY_VERSION
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import ResultSet

ENV_URL = "NEXUS_CELERY_PEER_REDIS_URL"
ENV_PREFETCH = "NEXUS_CELERY_PEER_PREFETCH"
ENV_ACKS_LATE = "NEXUS_CELERY_PEER_ACKS_LATE"
HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.splitext(os.path.basename(__file__))[0]  # "peer"
STEPS = 6
DEFAULT_PREFETCH = 4  # Celery's own default for worker_prefetch_multiplier


def log(msg):
    print(f"celery_peer: {msg}", file=sys.stderr, flush=True)


app = Celery("nexus_celery_peer")


def configure(redis_url, prefetch, acks_late):
    app.conf.update(
        broker_url=redis_url,
        result_backend=redis_url,
        worker_prefetch_multiplier=prefetch,
        task_acks_late=acks_late,
        broker_connection_retry_on_startup=True,
        # Keep the worker's log to the point; its stdout goes to our stderr.
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
    )


# The worker subprocess imports this module as `peer`: it finds its
# configuration in the environment set by main().
if os.environ.get(ENV_URL):
    configure(os.environ[ENV_URL],
              int(os.environ.get(ENV_PREFETCH, DEFAULT_PREFETCH)),
              os.environ.get(ENV_ACKS_LATE) == "1")


# Steps 1 to 5: their results travel in the next step's message, never
# through the result backend.
@app.task(name="nexus_celery_peer.step", ignore_result=True)
def step(x=None):
    return x


# Step 6: the one result the caller waits for.
@app.task(name="nexus_celery_peer.last")
def last(x=None):
    return x


class Interrupted(BaseException):
    """A signal asked us to stop (BaseException: no `except Exception` in a
    library swallows it)."""


_stop_signal = None


def _on_signal(signum, _frame):
    # Python drops exceptions raised while a __del__ runs (celery's
    # AsyncResult has one), so the flag is also checked at safe points.
    global _stop_signal
    _stop_signal = signal.Signals(signum).name
    raise Interrupted(_stop_signal)


def check_stop():
    if _stop_signal:
        raise Interrupted(_stop_signal)


def start_worker(redis_url, concurrency, prefetch, acks_late, hostname):
    env = dict(os.environ)
    env[ENV_URL] = redis_url
    env[ENV_PREFETCH] = str(prefetch)
    env[ENV_ACKS_LATE] = "1" if acks_late else "0"
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [
        sys.executable, "-m", "celery", "-A", f"{MODULE}:app", "worker",
        "--pool=prefork", f"--concurrency={concurrency}",
        "--loglevel=WARNING", "-n", hostname,
    ]
    log("starting worker: " + " ".join(cmd[1:]))
    # Its own session: a ctrl-c in the terminal reaches only us, and we stop
    # the worker (and its pool processes, same process group) ourselves.
    return subprocess.Popen(
        cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
        stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno(),
        start_new_session=True,
    )


def wait_ready(worker, hostname, deadline):
    while True:
        check_stop()
        if worker.poll() is not None:
            raise RuntimeError(
                f"worker exited with status {worker.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError("worker did not answer ping in time")
        try:
            replies = app.control.ping(destination=[hostname], timeout=0.5)
        except Exception as e:  # broker not reachable yet, etc.
            log(f"ping failed: {e!r}")
            time.sleep(0.5)
            continue
        if any(hostname in r for r in replies):
            return


def stop_worker(worker, grace=15.0):
    if worker is None:
        return
    pgid = worker.pid  # start_new_session: the group id is the worker's pid
    if worker.poll() is None:
        log("stopping worker (warm shutdown)")
        try:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log("worker lingers: SIGQUIT (cold shutdown)")
            try:
                worker.send_signal(signal.SIGQUIT)
                worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        except ProcessLookupError:
            pass
    # Pool processes left behind in the worker's own group get SIGKILL.
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        pass
    else:
        time.sleep(0.5)
        try:
            os.killpg(pgid, signal.SIGKILL)
            log("killed leftover worker processes")
        except (ProcessLookupError, PermissionError):
            pass
    if worker.poll() is None:
        worker.kill()
        worker.wait()


def run_chains(start, count, deadline):
    """Submits `count` chains as fast as possible, then waits for all of
    them; returns (submit_seconds, total_seconds)."""
    t0 = time.perf_counter()
    results = []
    for i in range(start, start + count):
        results.append(
            chain(step.s(i), *[step.s() for _ in range(STEPS - 2)], last.s()).apply_async())
        if i % 64 == 0:
            check_stop()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out while submitting ({len(results)} of {count} sent)")
    t_submit = time.perf_counter() - t0
    seen = set()

    def done(task_id, value):
        seen.add(value)

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("timed out right after submitting")
    try:
        ResultSet(results, app=app).join_native(
            timeout=remaining, callback=done, propagate=True,
            on_interval=check_stop)
    except CeleryTimeoutError:
        raise TimeoutError(
            f"timed out: {len(seen)} of {count} chains finished") from None
    total = time.perf_counter() - t0
    want = set(range(start, start + count))
    if seen != want:
        raise RuntimeError(
            f"wrong chain results: {len(want - seen)} missing, "
            f"{len(seen - want)} unexpected")
    return t_submit, total


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Celery 5 peer of the Nexus benchmark: N chains of "
                    f"{STEPS} no-op tasks through Redis.")
    p.add_argument("--redis-url", required=True,
                   help="broker and result backend, e.g. redis://127.0.0.1:6399/1")
    p.add_argument("--chains", type=int, required=True, help="chains to run (N)")
    p.add_argument("--concurrency", type=int, default=os.cpu_count() or 1,
                   help="prefork worker processes (default: os.cpu_count())")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds for the whole run, worker start included (default 600)")
    p.add_argument("--prefetch-multiplier", type=int, default=DEFAULT_PREFETCH,
                   help=f"worker_prefetch_multiplier (default {DEFAULT_PREFETCH}, Celery's)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed chains run first (default: 2 * concurrency)")
    p.add_argument("--acks-late", action="store_true",
                   help="task_acks_late=True: ack after the task ran (at least once)")
    p.add_argument("--handshake", action="store_true",
                   help="print a line after the warm-up and wait for stdin around the "
                        "timed run (see the module's docstring)")
    a = p.parse_args(argv)
    if a.chains < 1:
        p.error("--chains must be >= 1")
    if a.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if a.timeout <= 0:
        p.error("--timeout must be > 0")
    if a.prefetch_multiplier < 1:
        p.error("--prefetch-multiplier must be >= 1")
    if not a.redis_url.startswith(("redis://", "rediss://", "unix://")):
        p.error("--redis-url must be a redis:// URL")
    if a.warmup is None:
        a.warmup = 2 * a.concurrency
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    return a


def main(argv=None):
    args = parse_args(argv)
    deadline = time.monotonic() + args.timeout
    configure(args.redis_url, args.prefetch_multiplier, args.acks_late)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)

    hostname = f"nexus-celery-peer-{os.getpid()}@localhost"
    worker = None
    ok = False
    try:
        purged = app.control.purge()
        if purged:
            log(f"purged {purged} stale message(s)")
        worker = start_worker(args.redis_url, args.concurrency,
                              args.prefetch_multiplier, args.acks_late, hostname)
        wait_ready(worker, hostname, min(deadline, time.monotonic() + 120))
        others = [n for r in app.control.ping(timeout=0.5) for n in r
                  if n != hostname]
        if others:
            log(f"WARNING: other workers consume this queue too: {others}")
        log(f"worker ready (concurrency={args.concurrency}, "
            f"prefetch_multiplier={args.prefetch_multiplier}, "
            f"acks_late={args.acks_late}, celery {CELERY_VERSION})")

        warmup_seconds = 0.0
        if args.warmup:
            _, warmup_seconds = run_chains(-args.warmup, args.warmup, deadline)
            log(f"warm-up: {args.warmup} chains in {warmup_seconds:.3f}s")
        if args.handshake:
            print(json.dumps({"warm": True, "worker_pid": worker.pid,
                              "warmup_seconds": round(warmup_seconds, 6)}), flush=True)
            if not sys.stdin.readline():
                raise RuntimeError("stdin closed before the timed run")

        t_submit, seconds = run_chains(0, args.chains, deadline)
        rate = args.chains / seconds
        log(f"{args.chains} chains ({STEPS * args.chains} tasks): submitted in "
            f"{t_submit:.3f}s, all done in {seconds:.3f}s -> {rate:.1f} chains/s")
        line = json.dumps({
            "chains": args.chains,
            "tasks": STEPS * args.chains,
            "seconds": round(seconds, 6),
            "chains_per_second": round(rate, 3),
            "concurrency": args.concurrency,
            "acks_late": args.acks_late,
            "warmup": args.warmup,
            "celery": CELERY_VERSION,
        })
        # Printed while the worker still runs: with --handshake the caller
        # reads its counters now, then lets us stop it.
        print(line, flush=True)
        ok = True
        if args.handshake:
            sys.stdin.readline()
    except Interrupted as e:
        log(f"interrupted ({e})")
        return 128 + signal.Signals[str(e)].value
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as e:
        log(f"error: {type(e).__name__}: {e}")
        return 1
    finally:
        # A second signal during shutdown must not leave the worker running.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        stop_worker(worker)
        if worker is not None and not ok:
            # Leave no backlog of this run's messages in the queue.
            try:
                app.control.purge()
            except Exception as e:
                log(f"purge after failure failed: {e!r}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: celery's AsyncResult.__del__ would try to
    # unsubscribe every pending result from Redis while Python shuts down.
    os._exit(code)

// The load driver of the BullMQ peer: N sequential six-step chains, each the
// idiomatic BullMQ way, a FlowProducer tree of depth 6 (a flow's children run
// before their parent, so step 1 is the innermost child and step 6 the root;
// every job `removeOnComplete: true`). Workers run elsewhere (worker.js, two
// processes started by the bench).
//
//   node bench/bullmq_peer/driver.js --redis-url redis://127.0.0.1:6399/0 --chains 2000 \
//       [--warmup 200] [--lanes 32] [--timeout 600] [--handshake]
//
// It runs an untimed warm-up (Node compiles hot code as it goes), then adds N
// flows from `lanes` concurrent loops (like the Nexus figure's 32 concurrent
// starts) and waits for every root's `completed` event (QueueEvents). The time
// runs from the first add to the last root's completion as Redis stamped it
// (the event's stream id). stdout, one JSON line:
//   {"chains": N, "jobs": 6N, "seconds": S, "chains_per_sec": X, "warmup": W, "bullmq": "…", "ioredis": "…", "node": "…"}
// With --handshake (how the bench runs it, to read CPU and Redis counters
// around exactly the timed window) it first prints {"warm": true, "warmup_seconds": s}
// after the warm-up, waits for a line on stdin before the timed run, and
// after the result line waits for another line (or the end of stdin) before
// closing its connections. Exit status 0 ok, 1 failure, 2 bad arguments.
'use strict';

const { FlowProducer, Queue, QueueEvents } = require('bullmq');
const { Redis } = require('ioredis');
const { QUEUE, option, flag, versions, nextLine } = require('./common');

const STEPS = 6;
const url = option('--redis-url');
const chains = Number(option('--chains'));
const warmup = Number(option('--warmup', '200'));
const lanes = Number(option('--lanes', '32'));
const timeoutSeconds = Number(option('--timeout', '600'));
const handshake = flag('--handshake');
if (!url || !(chains >= 1) || !(warmup >= 0) || !(lanes >= 1) || !(timeoutSeconds > 0)) {
  console.error('usage: driver.js --redis-url URL --chains N [--warmup W] [--lanes L] [--timeout S] [--handshake]');
  process.exit(2);
}
const log = message => console.error(`bullmq_peer: ${message}`);

/** Chain `n` as a flow: step 6 at the root, step 1 the deepest child. */
function chainFlow(n) {
  let node;
  for (let step = 1; step <= STEPS; step++) {
    node = {
      name: `step-${step}`,
      queueName: QUEUE,
      data: { chain: n, step },
      opts: { removeOnComplete: true },
      ...(node ? { children: [node] } : {}),
    };
  }
  return node;
}

/** When each job completed (Redis's clock, ms), from the queue's events. */
class Completions {
  constructor(events) {
    this.at = new Map();
    this.pending = null;
    this.wake = null;
    this.lastEventAt = Date.now();
    events.on('completed', ({ jobId }, id) => {
      this.lastEventAt = Date.now();
      this.at.set(jobId, Number(String(id).split('-')[0]) || Date.now());
      if (this.pending && this.pending.delete(jobId) && this.pending.size === 0) this.wake();
    });
    events.on('failed', ({ jobId, failedReason }) => log(`job ${jobId} failed: ${failedReason}`));
    events.on('error', error => log(`queue events: ${error}`));
  }

  /** Resolves with the latest completion time once every id completed. */
  async all(ids, deadline) {
    this.pending = new Set(ids.filter(id => !this.at.has(id)));
    while (this.pending.size > 0) {
      const now = Date.now();
      if (now > deadline) throw new Error(`timed out: ${this.pending.size} of ${ids.length} chains unfinished`);
      if (now - this.lastEventAt > 60_000) {
        throw new Error(`no job completed for 60 s; ${this.pending.size} of ${ids.length} chains unfinished`);
      }
      await new Promise(wake => {
        this.wake = wake;
        setTimeout(wake, 1000);
      });
    }
    this.pending = null;
    let last = 0;
    for (const id of ids) last = Math.max(last, this.at.get(id));
    return last;
  }

  /** Drops what is known (the map only grows otherwise). */
  clear() {
    this.at.clear();
  }
}

/** Adds chains `from..from+count` from `lanes` concurrent loops; returns the root ids. */
async function addChains(flows, from, count, deadline) {
  const roots = new Array(count);
  let next = 0;
  async function lane() {
    while (next < count) {
      const n = next++;
      const tree = await flows.add(chainFlow(from + n));
      roots[n] = tree.job.id;
      if (Date.now() > deadline) throw new Error(`timed out while adding (${n} of ${count} added)`);
    }
  }
  await Promise.all(Array.from({ length: Math.min(lanes, count) }, lane));
  return roots;
}

async function main() {
  const deadline = Date.now() + timeoutSeconds * 1000;
  const connection = new Redis(url, { maxRetriesPerRequest: null });
  // The queue's settings live in Redis: room for every event of a run in the
  // events stream (default 10,000), so no root's `completed` is trimmed away
  // before it is read.
  const queue = new Queue(QUEUE, { connection, streams: { events: { maxLen: 500_000 } } });
  await queue.getVersion();
  // From the stream's start: nothing from the warm-up is missed however long
  // the first blocking read takes to be issued.
  const events = new QueueEvents(QUEUE, { connection: { url, maxRetriesPerRequest: null }, lastEventId: '0-0' });
  await events.waitUntilReady();
  const completions = new Completions(events);
  const flows = new FlowProducer({ connection });
  await flows.waitUntilReady();
  try {
    if (warmup > 0) {
      const began = Date.now();
      const roots = await addChains(flows, -warmup, warmup, deadline);
      await completions.all(roots, deadline);
      completions.clear();
      log(`warm-up: ${warmup} chains in ${((Date.now() - began) / 1000).toFixed(3)} s`);
      if (handshake) {
        process.stdout.write(JSON.stringify({ warm: true, warmup_seconds: (Date.now() - began) / 1000 }) + '\n');
      }
    } else if (handshake) {
      process.stdout.write(JSON.stringify({ warm: true, warmup_seconds: 0 }) + '\n');
    }
    if (handshake && (await nextLine()) === null) throw new Error('stdin closed before the timed run');

    const began = Date.now();
    const roots = await addChains(flows, 0, chains, deadline);
    const added = (Date.now() - began) / 1000;
    const last = await completions.all(roots, deadline);
    const seconds = Math.max(last - began, 1) / 1000;
    log(`${chains} chains (${STEPS * chains} jobs): added in ${added.toFixed(3)} s, done in ${seconds.toFixed(3)} s`);
    process.stdout.write(
      JSON.stringify({
        chains,
        jobs: STEPS * chains,
        seconds,
        chains_per_sec: chains / seconds,
        warmup,
        ...versions(),
      }) + '\n',
    );
    if (handshake) await nextLine();
  } finally {
    await Promise.allSettled([flows.close(), events.close(), queue.close()]);
    await connection.quit().catch(() => {});
  }
}

main().then(
  () => process.exit(0),
  error => {
    log(`error: ${error && error.stack ? error.stack : error}`);
    process.exit(1);
  },
);

// One BullMQ worker process of the Nexus throughput benchmark's BullMQ peer:
// a no-op processor on the chain queue, `concurrency` jobs at a time.
//
//   node bench/bullmq_peer/worker.js --redis-url redis://127.0.0.1:6399/0 [--concurrency 50]
//
// Prints one JSON line on stdout once it is connected and taking jobs:
//   {"ready": true, "pid": 1234, "concurrency": 50, "bullmq": "6.7.0"}
// and nothing else there (errors go to stderr). SIGTERM or SIGINT closes the
// worker (active jobs finish first) and exits 0.
'use strict';

const { Worker } = require('bullmq');
const { Redis } = require('ioredis');
const { QUEUE, option, versions } = require('./common');

const url = option('--redis-url');
const concurrency = Number(option('--concurrency', '50'));
if (!url || !(concurrency >= 1)) {
  console.error('usage: worker.js --redis-url URL [--concurrency N]');
  process.exit(2);
}

// BullMQ's documented setting for worker connections: never give up on a
// command while Redis is briefly away.
const connection = new Redis(url, { maxRetriesPerRequest: null });
// A chain step does nothing: the figure is the queue's own cost.
const worker = new Worker(QUEUE, async () => null, { connection, concurrency });
worker.on('failed', (job, error) => console.error(`bullmq worker: job ${job && job.id} failed: ${error}`));
worker.on('error', error => console.error(`bullmq worker: ${error}`));

let closing = false;
async function stop() {
  if (closing) return;
  closing = true;
  try {
    await worker.close();
    await connection.quit();
  } finally {
    process.exit(0);
  }
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

worker
  .waitUntilReady()
  .then(() => {
    process.stdout.write(
      JSON.stringify({ ready: true, pid: process.pid, concurrency, bullmq: versions().bullmq }) + '\n',
    );
  })
  .catch(error => {
    console.error(`bullmq worker: cannot start: ${error}`);
    process.exit(1);
  });

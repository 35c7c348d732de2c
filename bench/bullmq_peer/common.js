// What worker.js and driver.js share.
'use strict';

const readline = require('node:readline');

/** The one queue every step of a chain goes through. */
const QUEUE = 'nexus-chain';

/** `--name value` from the command line, or `fallback`. */
function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

function flag(name) {
  return process.argv.includes(name);
}

function versions() {
  return {
    bullmq: require('bullmq/package.json').version,
    ioredis: require('ioredis/package.json').version,
    node: process.versions.node,
  };
}

let lines;
/** The next line on stdin; null at its end. */
function nextLine() {
  if (!lines) {
    lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  }
  return lines.next().then(next => (next.done ? null : next.value));
}

module.exports = { QUEUE, option, flag, versions, nextLine };

// Drives the orchestrator's web tracker in Debian's headless Chromium, as a
// person would, for tests/tests/web.rs. It checks what only the page can
// tell (states change, a reload restores the page and resumes by cursor) and
// prints what the page shows as one `RESULT {json}` line, for the Rust test
// to compare with Redis and GetWorkflow.
//
// Environment:
//   NEXUS_WEB_URL     the page, e.g. http://127.0.0.1:50051/
//   NEXUS_WEB_MODE    "run" (default): start, watch, reload, finish;
//                     "auth": the server wants NEXUS_WEB_TOKEN
//   NEXUS_WEB_BLIP=1  mid-run, print "BLIP" and wait for a line on stdin
//                     (the test restarts the orchestrator meanwhile)
//   NEXUS_WEB_SCREENSHOT  where to save the screenshot
//   CHROMIUM          the browser (default /usr/bin/chromium)

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const url = process.env.NEXUS_WEB_URL;
const mode = process.env.NEXUS_WEB_MODE || "run";
const screenshot = process.env.NEXUS_WEB_SCREENSHOT || "web-tracker.png";

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

// The next line on stdin (opened only when needed: an open stdin keeps Node
// running).
async function readLine() {
  const lines = createInterface({ input: process.stdin });
  const line = await lines[Symbol.asyncIterator]().next();
  lines.close();
  return line.value;
}

async function fillPlan(page, name) {
  await page.fill("#plan-name", name);
  await page.fill("#plan-description", "An online shop for handmade furniture: catalogue, checkout, delivery tracking.");
  await page.fill("#plan-fields", "budget=120k EUR\ntimeline=6 months");
}

const phase = (i) => `.phase[data-index="${i}"]`;

async function phaseText(page, i) {
  return page.locator(`${phase(i)} .text`).textContent();
}

// Waits until phase `i` runs and shows some streamed text.
async function whileStreaming(page, i) {
  await page.waitForFunction((sel) => {
    const card = document.querySelector(sel);
    return card?.dataset.state === "running" && card.querySelector(".text").textContent.length > 0;
  }, phase(i));
}

async function fullRun(page) {
  await page.goto(url);
  await fillPlan(page, "Browser plan");
  await page.click("#start");
  await page.waitForFunction(() => location.hash.length > 1);
  const id = await page.evaluate(() => location.hash.slice(1));

  // Phase states change live.
  await page.waitForSelector(`${phase(0)}[data-state="running"]`);
  await page.waitForSelector(`${phase(0)}[data-state="completed"]`);
  const phaseCount = await page.locator(".phase").count();
  check(phaseCount === 6, `six phase cards, saw ${phaseCount}`);

  // Reload mid-phase: the page comes back from its saved state and watches
  // after the saved cursor, so nothing is applied twice.
  await whileStreaming(page, 1);
  const before = { done: await phaseText(page, 0), partial: await phaseText(page, 1) };
  await page.reload();
  await page.waitForSelector(`${phase(0)}[data-state="completed"]`);
  const restored = await phaseText(page, 0);
  check(restored === before.done, "a completed phase's text is the same after the reload");
  const afterReload = await page.evaluate(() => window.nexusTracker.debug.watches.slice());
  check(afterReload.length >= 1 && afterReload[0] !== "", `after the reload the watch resumes by cursor: ${JSON.stringify(afterReload)}`);
  const resumedText = await phaseText(page, 1);
  check(resumedText.startsWith(before.partial), "the streaming phase keeps what it showed before the reload");

  // A network blip: the orchestrator goes away mid-run and comes back.
  let blipWatches = [];
  if (process.env.NEXUS_WEB_BLIP === "1") {
    await whileStreaming(page, 3);
    console.log("BLIP");
    await readLine();
    await page.waitForFunction(() => window.nexusTracker.debug.watches.length >= 2);
    blipWatches = await page.evaluate(() => window.nexusTracker.debug.watches.slice());
    check(blipWatches.every((cursor) => cursor !== ""), `every watch after the blip resumes by cursor: ${JSON.stringify(blipWatches)}`);
  }

  await page.waitForSelector('#run-status[data-status="completed"]', { timeout: 120_000 });
  await page.waitForSelector("#rating:not([hidden])");

  // The Markdown renderer: formats, and never lets HTML through.
  const md = await page.evaluate(() => window.nexusTracker.renderMarkdown(
    "# Plan\n\nSome *fine* **bold** `code` <script>alert(1)</script>\n\n- one\n- two\n\n1. first\n\n| a | b |\n|---|---|\n| 1 | 2 |"));
  for (const part of ["<h1>Plan</h1>", "<em>fine</em>", "<strong>bold</strong>", "<code>code</code>",
    "&lt;script&gt;", "<ul><li>one</li><li>two</li></ul>", "<ol><li>first</li></ol>", "<td>1</td>"]) {
    check(md.includes(part), `Markdown output has ${part}: ${md}`);
  }
  check(!md.includes("<script>"), "no raw HTML passes the Markdown renderer");

  await page.locator("#outcome").scrollIntoViewIfNeeded();
  return {
    id,
    phases: await page.$$eval(".phase", (cards) => cards.map((card) => ({
      name: card.dataset.name,
      state: card.dataset.state,
      streamed: card.dataset.streamed === "true",
      text: card.querySelector(".text").textContent,
      stats: card.querySelector(".stats").textContent,
    }))),
    finalPlan: await page.locator("#final-plan").textContent(),
    score: Number((await page.locator("#score").textContent()).split("/")[0]),
    reasons: await page.locator("#reasons li").allTextContents(),
    usageRows: await page.locator("#usage tr").count(),
    listed: await page.locator(`#runs a[data-id="${id}"]`).count(),
    watchesAfterReload: afterReload,
    watchesAfterBlip: blipWatches,
  };
}

async function authRun(page) {
  const token = process.env.NEXUS_WEB_TOKEN;
  await page.goto(url);
  // Without the token: the list and a start are refused, and the page says so.
  await page.waitForSelector("#runs-error:not([hidden])");
  const listError = await page.locator("#runs-error").textContent();
  await fillPlan(page, "Token plan");
  await page.click("#start");
  await page.waitForSelector("#start-error:not([hidden])");
  const startError = await page.locator("#start-error").textContent();
  // With it, everything works.
  await page.fill("#token", token);
  await page.locator("#token").dispatchEvent("change");
  await page.waitForSelector("#runs-error", { state: "hidden" });
  await page.click("#start");
  await page.waitForFunction(() => location.hash.length > 1);
  await page.waitForSelector('#run-status[data-status="completed"]');
  return {
    id: await page.evaluate(() => location.hash.slice(1)),
    listError,
    startError,
    score: Number((await page.locator("#score").textContent()).split("/")[0]),
  };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Playwright gives every launch a new, empty profile (--user-data-dir).
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(Number(process.env.NEXUS_WEB_TIMEOUT_MS || 60_000));
  page.on("pageerror", (error) => console.error(`page error: ${error.message}`));
  page.on("console", (message) => { if (message.type() === "error") console.error(`page console: ${message.text()}`); });
  let result;
  try {
    result = mode === "auth" ? await authRun(page) : await fullRun(page);
  } finally {
    await page.screenshot({ path: screenshot, fullPage: true }); // on failure too: what went wrong
  }
  console.log(`RESULT ${JSON.stringify(result)}`);
} finally {
  await browser.close();
}
process.exit(0);

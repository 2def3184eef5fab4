/**
 * What the drivers share: their arguments, a headless Chromium, the dashboard page, `vtrio`
 * commands, and waiting for a condition under a deadline.
 *
 * The drivers are run by tests/test_browser.py, which starts the server and passes:
 *   --dashboard URL   the dashboard's page (http://HOST:PORT/)
 *   --ws URL          the server's websocket (for `vtrio call`, and vtrio.js in Node)
 *   --key USER=KEY    an API key of USER (repeatable)
 *   --python PATH     the Python that runs `python -m vtrio` (the server's)
 *   --report PATH     where a driver writes what it observed, as JSON, for the test to judge
 *   --screenshot PATH where the screenshot driver writes its PNG
 *   --reads NAME      a reads file in uploads/, and --count N its number of reads
 *   --sample NAME     the sample a driver is about
 * and, in the environment, VTRIO_MONGODB_URL, VTRIO_DB_NAME and VTRIO_DATA_DIR: the settings
 * with which admin commands (`vtrio keys ...`) reach the server's database.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdir, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs, promisify } from "node:util";

import { chromium } from "playwright-core";

const run = promisify(execFile);
const pageErrors = new WeakMap(); // page -> errors it threw
const ARTIFACTS = fileURLToPath(new URL("artifacts/", import.meta.url));

/** Chromium: Debian's by default (`apt-get install chromium`); CHROMIUM names another. */
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

/**
 * Flags for a closed network: without the background-networking ones Chromium keeps trying to
 * reach Google's services, and this machine's network refuses its connections. Playwright
 * gives every launch a fresh temporary profile (user-data-dir) and deletes it on close.
 */
const CHROMIUM_FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export const args = parseArgs({
  options: {
    dashboard: { type: "string" },
    ws: { type: "string" },
    key: { type: "string", multiple: true, default: [] },
    python: { type: "string", default: "python3" },
    report: { type: "string" },
    screenshot: { type: "string" },
    reads: { type: "string" },
    count: { type: "string" },
    sample: { type: "string" },
  },
}).values;

/** The API key of `user`, as passed with --key USER=KEY. */
export function keyOf(user) {
  const found = args.key.find((entry) => entry.startsWith(`${user}=`));
  assert.ok(found, `no --key ${user}=KEY argument`);
  return found.slice(user.length + 1);
}

/**
 * Run `fn(browser)` with a headless Chromium of its own, closed afterwards whatever happens
 * (and by Playwright itself should this process be interrupted, e.g. by the test's timeout).
 */
export async function withBrowser(fn) {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_FLAGS,
    timeout: 30_000,
  });
  try {
    return await fn(browser);
  } catch (error) {
    await saveScreenshots(browser);
    throw error;
  } finally {
    await browser.close();
  }
}

/** Keep a picture of every page of a failed driver, in artifacts/ (named in the output). */
async function saveScreenshots(browser) {
  const driver = basename(process.argv[1], ".mjs");
  const pages = browser.contexts().flatMap((context) => context.pages());
  await mkdir(ARTIFACTS, { recursive: true });
  for (const [index, page] of pages.entries()) {
    const path = join(ARTIFACTS, `${driver}-${index + 1}.png`);
    try {
      await page.screenshot({ path, fullPage: true, timeout: 5_000 });
      console.error(`the page as the driver failed: ${path}`);
    } catch (error) {
      console.error(`no screenshot of page ${index + 1}: ${error.message}`);
    }
  }
}

/**
 * Open the dashboard in a new browser context (its own sessionStorage) signed in with `key`
 * through `?token=`, and wait until it is live. `beforeLoad(page)` may listen to the page
 * before it loads. Errors the page throws fail the driver; its console goes to this process's
 * stderr, for the test's output.
 */
export async function openDashboard(browser, key, { viewport, beforeLoad } = {}) {
  const context = await browser.newContext({ viewport: viewport ?? { width: 1280, height: 860 } });
  context.setDefaultTimeout(15_000); // a failing wait says so well within the test's time
  const page = await context.newPage();
  page.on("console", (message) => console.error(`[page ${message.type()}] ${message.text()}`));
  const errors = [];
  pageErrors.set(page, errors);
  page.on("pageerror", (error) => {
    console.error(`[page error] ${error.stack ?? error}`);
    errors.push(error);
  });
  await beforeLoad?.(page);
  const address = new URL(args.dashboard);
  address.searchParams.set("token", key);
  await page.goto(address.href);
  await waitForStatus(page, "live");
  return page;
}

/** Wait until the page's status pill says `status`. */
export async function waitForStatus(page, status, timeout = 15_000) {
  await page.locator(`[data-testid="status"][data-status="${status}"]`).waitFor({ timeout });
}

/** The dashboard's row of the sample named `name`. */
export function sampleRow(page, name) {
  return page
    .getByTestId("sample-row")
    .filter({ has: page.getByTestId("sample-name").getByText(name, { exact: true }) });
}

/** Fail if the page threw. */
export function assertNoPageErrors(page) {
  assert.deepEqual(pageErrors.get(page).map(String), [], "the page threw");
}

/** Run `python -m vtrio ARGS` beside the server; its stdout. Fails if it fails. */
export async function vtrio(commandArgs, env = {}) {
  try {
    const { stdout } = await run(args.python, ["-m", "vtrio", ...commandArgs], {
      timeout: 60_000,
      env: { ...process.env, ...env },
    });
    return stdout;
  } catch (error) {
    throw new Error(`vtrio ${commandArgs.join(" ")} failed: ${error.stderr || error.message}`);
  }
}

/** `vtrio call METHOD PARAMS` as `user`; the parsed result. */
export async function vtrioCall(user, method, params = {}) {
  // The key in the environment rather than in argv, where any `ps` shows it.
  const env = { VTRIO_URL: args.ws, VTRIO_KEY: keyOf(user) };
  return JSON.parse(await vtrio(["call", method, JSON.stringify(params)], env));
}

/** Poll `condition()` (sync or async) until it is truthy; fail after `timeout` ms. */
export async function waitFor(description, condition, timeout = 10_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeout} ms waiting for ${description}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Write what the driver observed, for tests/test_browser.py to judge. */
export async function report(observed) {
  assert.ok(args.report, "no --report PATH argument");
  await writeFile(args.report, JSON.stringify(observed, null, 2));
}

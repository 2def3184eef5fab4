/**
 * Jobs from the page: a sample_stats job started with its button shows its bar moving, ends
 * complete, and its sample's quality plot appears; a second job, queued behind it (the server
 * runs one job at a time), is cancelled with its button.
 *
 * --reads names a FASTQ file in uploads/ large enough for several progress reports (the
 * server reports at most every 0.25 s), and --count its number of reads.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  args,
  assertNoPageErrors,
  keyOf,
  openDashboard,
  sampleRow,
  withBrowser,
} from "./harness.mjs";

/** The dashboard's row of the job of the sample named `name`. */
function jobRow(page, name) {
  return page
    .getByTestId("job-row")
    .filter({ has: page.getByTestId("job-sample").getByText(name, { exact: true }) });
}

async function createSample(page, name) {
  await page.getByTestId("new-sample-name").fill(name);
  await page.getByTestId("new-sample-reads").selectOption(args.reads);
  await page.getByTestId("new-sample-submit").click();
  await sampleRow(page, name).waitFor();
}

test("a job shows its progress, ends complete, its plot appears", { timeout: 90_000 }, async () => {
  await withBrowser(async (browser) => {
    const page = await openDashboard(browser, keyOf("alice"));
    await createSample(page, "big-1");
    await createSample(page, "big-2");
    await sampleRow(page, "big-1").getByTestId("sample-name").click();
    await page.getByTestId("details-name").getByText("big-1", { exact: true }).waitFor();

    // Every state and progress the jobs table shows, as the page changes it.
    await page.evaluate(() => {
      window.shown = [];
      const table = document.querySelector('[data-testid="jobs-table"]');
      const record = () => {
        for (const row of table.tBodies[0].rows) {
          const job = {
            sample: row.querySelector('[data-testid="job-sample"]').textContent,
            state: row.querySelector('[data-testid="job-state"]').textContent,
            progress: row.querySelector('[data-testid="job-progress"]').value,
            percent: row.querySelector('[data-testid="job-percent"]').textContent,
          };
          const last = window.shown.findLast((seen) => seen.sample === job.sample);
          if (JSON.stringify(last) !== JSON.stringify(job)) window.shown.push(job);
        }
      };
      new MutationObserver(record).observe(table, {
        subtree: true,
        childList: true,
        characterData: true,
        attributes: true,
      });
    });

    await sampleRow(page, "big-1").getByTestId("start-job").click();
    await sampleRow(page, "big-2").getByTestId("start-job").click();
    // While a job is waiting or running, its sample's button is off.
    await sampleRow(page, "big-1").locator('[data-testid="start-job"]:disabled').waitFor();

    const queued = jobRow(page, "big-2");
    await queued.getByTestId("job-state").getByText("waiting").waitFor();
    await queued.getByTestId("cancel-job").click();
    await queued.getByTestId("job-state").getByText("cancelled").waitFor();
    await queued.getByTestId("cancel-job").waitFor({ state: "hidden" });

    const job = jobRow(page, "big-1");
    await job.getByTestId("job-state").getByText("complete").waitFor({ timeout: 60_000 });
    assert.equal(await job.getByTestId("job-percent").textContent(), "100%");
    await job.getByTestId("cancel-job").waitFor({ state: "hidden" });

    const shown = (await page.evaluate(() => window.shown)).filter(
      ({ sample }) => sample === "big-1",
    );
    const progress = shown.map((job) => job.progress);
    console.error("big-1 as shown:", JSON.stringify(shown));
    assert.ok(
      progress.some((value) => value > 0 && value < 1),
      `no progress between 0 and 1 shown: ${progress}`,
    );
    assert.deepEqual(
      progress,
      [...progress].sort((a, b) => a - b),
      "progress went backwards",
    );
    assert.deepEqual(shown.at(-1), {
      sample: "big-1",
      state: "complete",
      progress: 1,
      percent: "100%",
    });
    assert.ok(
      shown.some((job) => job.state === "running"),
      "never shown running",
    );

    // The sample's update carried its statistics: the plot of big-1, which is selected.
    const line = page.getByTestId("quality-line");
    await line.waitFor();
    const points = (await line.getAttribute("points")).trim().split(/\s+/);
    assert.equal(points.length, 150, "one point per position of the 150-base reads");
    const reads = await page
      .locator('[data-testid="quality-stats"] [data-field="count"]')
      .textContent();
    assert.equal(reads.replace(/\D/g, ""), args.count);
    assert.equal(await sampleRow(page, "big-1").getByTestId("start-job").isDisabled(), false);
    assertNoPageErrors(page);
  });
});

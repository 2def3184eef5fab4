/**
 * The screenshot of the README: the dashboard with a few samples, their finished jobs, and the
 * read statistics of one of them. Written to --screenshot.
 *
 * The test has created the samples (--sample names the one to show) and started their jobs.
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

test("a screenshot of the dashboard", { timeout: 90_000 }, async () => {
  await withBrowser(async (browser) => {
    const page = await openDashboard(browser, keyOf("alice"), {
      viewport: { width: 1280, height: 720 },
    });
    const states = page.getByTestId("job-state");
    await page.waitForFunction(
      () => {
        const shown = [...document.querySelectorAll('[data-testid="job-state"]')];
        return shown.length > 0 && shown.every((state) => state.textContent === "complete");
      },
      null,
      { timeout: 60_000 },
    );
    assert.ok((await states.count()) >= 2);

    await sampleRow(page, args.sample).getByTestId("sample-name").click();
    await page.getByTestId("quality-line").waitFor();
    await page.screenshot({ path: args.screenshot, fullPage: true });
    assertNoPageErrors(page);
  });
});

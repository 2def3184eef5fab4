/**
 * The page signs in with ?token=, lists the samples its user may see, and follows their
 * changes live: inserts (its own and shared ones, not others' private ones), updates,
 * deletes, and a sample created from its own form. Reloading the page keeps the key.
 *
 * Before it runs, the test has created alice's sample "S-before" (host "Vitis vinifera").
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  assertNoPageErrors,
  keyOf,
  openDashboard,
  sampleRow,
  vtrioCall,
  waitForStatus,
  withBrowser,
} from "./harness.mjs";

test("the dashboard lists samples and follows their changes", { timeout: 90_000 }, async () => {
  await withBrowser(async (browser) => {
    const page = await openDashboard(browser, keyOf("alice"));

    // The key left the address bar (and so the history) for the tab's sessionStorage.
    assert.equal(new URL(page.url()).searchParams.has("token"), false);
    assert.equal(await page.evaluate(() => sessionStorage.getItem("vtrio.key")), keyOf("alice"));

    const before = sampleRow(page, "S-before");
    await before.waitFor();
    assert.equal(await before.getByTestId("sample-owner").textContent(), "alice");
    assert.equal(await before.getByTestId("sample-host").textContent(), "Vitis vinifera");
    assert.equal(await before.getByTestId("sample-reads").textContent(), "small.fq");
    assert.notEqual(await before.getByTestId("sample-created").textContent(), "");

    // bob's private sample, then one he shares with the lab: when the second shows, the first
    // would have (its message came first) had alice been sent it.
    await vtrioCall("bob", "samples.create", { name: "S-private", reads: "small.fq" });
    await vtrioCall("bob", "samples.create", {
      name: "S-shared",
      reads: "small.fq",
      group: "lab",
      group_read: true,
    });
    await sampleRow(page, "S-shared").waitFor();
    assert.equal(
      await sampleRow(page, "S-shared").getByTestId("sample-owner").textContent(),
      "bob",
    );
    assert.equal(await sampleRow(page, "S-private").count(), 0);

    const { id } = await vtrioCall("alice", "samples.list", { prefix: "S-before" }).then(
      (page) => page.items[0],
    );
    await vtrioCall("alice", "samples.update", { id, host: "Prunus avium" });
    await before.getByTestId("sample-host").getByText("Prunus avium", { exact: true }).waitFor();
    await vtrioCall("alice", "samples.delete", { id });
    await before.waitFor({ state: "detached" });

    // A sample made from the page's form, from a file that uploads.list offers.
    await page.getByTestId("new-sample-name").fill("S-page");
    await page.getByTestId("new-sample-reads").selectOption("small.fq");
    await page.getByTestId("new-sample-host").fill("Malus domestica");
    await page.getByTestId("new-sample-submit").click();
    const made = sampleRow(page, "S-page");
    await made.waitFor();
    assert.equal(await made.getByTestId("sample-host").textContent(), "Malus domestica");
    // ... and selected: its details say it has no statistics yet.
    await page.getByTestId("details-name").getByText("S-page", { exact: true }).waitFor();
    await page.getByTestId("no-quality").waitFor();

    // A second sample of that name is refused, and the page says why.
    await page.getByTestId("new-sample-name").fill("S-page");
    await page.getByTestId("new-sample-reads").selectOption("small.fq");
    await page.getByTestId("new-sample-submit").click();
    await page.getByTestId("error").getByText("exists").waitFor();

    // The key survives a reload of the page (sessionStorage), and so do the lists.
    await page.reload();
    await waitForStatus(page, "live");
    await sampleRow(page, "S-page").waitFor();
    assert.deepEqual(await page.getByTestId("sample-name").allTextContents(), [
      "S-page",
      "S-shared",
    ]);
    assertNoPageErrors(page);
  });
});

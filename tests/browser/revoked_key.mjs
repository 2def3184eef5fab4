/**
 * A key revoked while the page uses it (`vtrio keys revoke`): within seconds the page says it
 * is signed out, forgets the key and what it showed, offers the key form again, and does not
 * try to reconnect. Another key entered in the form brings it back live.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  assertNoPageErrors,
  keyOf,
  openDashboard,
  sampleRow,
  vtrio,
  waitForStatus,
  withBrowser,
} from "./harness.mjs";

test("a revoked key signs the page out", { timeout: 90_000 }, async () => {
  await withBrowser(async (browser) => {
    const sockets = [];
    const page = await openDashboard(browser, keyOf("alice"), {
      beforeLoad: (page) => page.on("websocket", (socket) => sockets.push(socket.url())),
    });
    await sampleRow(page, "alice-sample").waitFor();

    const keyIds = (await vtrio(["keys", "list", "alice"]))
      .trim()
      .split("\n")
      .map((line) => JSON.parse(line).id);
    assert.equal(keyIds.length, 1, "alice has the one key the page uses");
    await vtrio(["keys", "revoke", keyIds[0]]);

    // The server checks keys every 2 s.
    await waitForStatus(page, "signed-out", 10_000);
    await page.getByTestId("signed-out-message").waitFor();
    await page.getByTestId("key-form").waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem("vtrio.key")), null);
    assert.equal(await page.getByTestId("sample-row").count(), 0, "what alice saw is gone");
    // Longer than the first reconnection delay (1 s at most): a retry would have shown.
    await page.waitForTimeout(1_500);
    const connections = sockets.length;

    await page.getByTestId("key-input").fill(keyOf("bob"));
    await page.getByTestId("key-submit").click();
    await waitForStatus(page, "live");
    await page.getByTestId("signed-out-message").waitFor({ state: "hidden" });
    await sampleRow(page, "bob-sample").waitFor();
    assert.equal(await sampleRow(page, "alice-sample").count(), 0, "alice's is not shared");
    // The revoked key was never tried again: the one connection since is bob's.
    assert.equal(sockets.length, connections + 1);
    assert.ok(sockets.at(-1).includes(encodeURIComponent(keyOf("bob"))));
    assertNoPageErrors(page);
  });
});

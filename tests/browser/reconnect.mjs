/**
 * The page's connection is cut (the browser goes offline), a change is made meanwhile from
 * outside (`vtrio call`), and the page comes back live showing it: through a resume (?since=)
 * where the server supports it, through a reload where not.
 *
 * Writes --report: every websocket URL the page opened and whether the server sent positions,
 * for the test to judge the resume itself.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  assertNoPageErrors,
  keyOf,
  openDashboard,
  report,
  sampleRow,
  vtrioCall,
  waitForStatus,
  withBrowser,
} from "./harness.mjs";

test("the page comes back live after its connection is cut", { timeout: 90_000 }, async () => {
  await withBrowser(async (browser) => {
    const sockets = [];
    let positionsSeen = false;
    const page = await openDashboard(browser, keyOf("alice"), {
      beforeLoad: (page) =>
        page.on("websocket", (socket) => {
          sockets.push(socket.url());
          socket.on("framereceived", ({ payload }) => {
            const frame = JSON.parse(payload);
            const messages = Array.isArray(frame) ? frame : [frame];
            if (messages.some((message) => message.position ?? message.result?.position)) {
              positionsSeen = true;
            }
          });
        }),
    });
    await page.evaluate(() => {
      const status = document.querySelector('[data-testid="status"]');
      window.statuses = [status.dataset.status];
      new MutationObserver(() => window.statuses.push(status.dataset.status)).observe(status, {
        attributes: true,
        attributeFilter: ["data-status"],
      });
    });

    await page.context().setOffline(true);
    await waitForStatus(page, "offline");
    await vtrioCall("alice", "samples.create", { name: "made-while-offline", reads: "small.fq" });
    await page.context().setOffline(false);

    await sampleRow(page, "made-while-offline").waitFor();
    await waitForStatus(page, "live");
    const statuses = await page.evaluate(() => window.statuses);
    assert.equal(sockets.length, 2, `one connection before the cut, one after: ${sockets}`);
    assert.deepEqual(statuses.slice(0, 2), ["live", "offline"]);
    assert.ok(["resuming", "connecting"].includes(statuses[2]), `then reconnected: ${statuses}`);
    assertNoPageErrors(page);
    await report({ sockets, positionsSeen, statuses });
  });
});

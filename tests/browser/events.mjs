// The event stream in a real browser: headless Chromium opens a native EventSource with
// a ticket (no custom headers), sees a change made over HTTP outside the browser, then
// reconnects as the README shows — a fresh ticket plus the last event id as `cursor` —
// and gets the change made while it was disconnected.
//
//   node events.mjs <base URL> <token> <user id>
//
// Exits 0 when everything was seen; otherwise prints what was missing and exits 1.
import { chromium } from "playwright-core";

const [base, token, user] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

async function createTask(title) {
  const response = await fetch(`${base}/api/${user}/tasks`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ title }),
  });
  if (response.status !== 201) throw new Error(`create: ${response.status}`);
  return response.json();
}

try {
  const page = await browser.newPage();
  // Any page of the service's origin will do.
  await page.goto(`${base}/health`);
  // In the page: a ticket (fetch with the token), then the browser's own EventSource.
  await page.evaluate(async ({ token, user }) => {
    window.seen = { ready: null, changes: [], errors: 0 };
    window.open = async (cursor) => {
      const response = await fetch(`/api/${user}/events/tickets`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}` },
      });
      const { ticket } = await response.json();
      const query = new URLSearchParams({ ticket });
      if (cursor) query.set("cursor", cursor);
      const source = new EventSource(`/api/${user}/events?${query}`);
      source.addEventListener("ready", (e) => { window.seen.ready = JSON.parse(e.data); });
      source.addEventListener("change", (e) => {
        window.seen.changes.push({ id: e.lastEventId, change: JSON.parse(e.data) });
      });
      source.onerror = () => { window.seen.errors += 1; };
      window.source = source;
    };
    await window.open(null);
  }, { token, user });
  await page.waitForFunction(() => window.seen.ready !== null, null, { timeout: 10000 });

  const first = await createTask("Seen live in the browser");
  await page.waitForFunction(() => window.seen.changes.length >= 1, null, { timeout: 10000 });
  const got = await page.evaluate(() => window.seen.changes[0]);
  if (got.change.type !== "upsert" || got.change.task.id !== first.id || got.change.task.title !== first.title) {
    throw new Error(`unexpected change: ${JSON.stringify(got)}`);
  }

  // Disconnect; a change happens meanwhile; reconnect with a fresh ticket and the last id.
  await page.evaluate(() => window.source.close());
  const missed = await createTask("Made while the tab was away");
  await page.evaluate((cursor) => {
    window.seen.ready = null;
    return window.open(cursor);
  }, got.id);
  await page.waitForFunction(() => window.seen.changes.length >= 2, null, { timeout: 10000 });
  const resumed = await page.evaluate(() => window.seen.changes.slice(1));
  if (resumed.length !== 1 || resumed[0].change.task.id !== missed.id) {
    throw new Error(`after reconnecting: ${JSON.stringify(resumed)}`);
  }
  console.log(`EventSource saw ${first.id} live and ${missed.id} after reconnecting with a fresh ticket`);
  await browser.close();
  process.exit(0);
} catch (error) {
  console.log(`browser event stream check failed: ${error.message}`);
  await browser.close();
  process.exit(1);
}

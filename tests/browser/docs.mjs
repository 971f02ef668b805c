// Opens the service's Swagger UI in headless Chromium as a person would: authorizes with
// a token, runs "list tasks" for the user, and checks the 200 and the task in its body.
//
//   node docs.mjs <base URL> <token> <user id> <expected task title> <screenshot path>
//
// Exits 0 when everything was seen; otherwise prints what was missing and exits 1.
import { chromium } from "playwright-core";

const [base, token, user, title, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
// Everything the page loads must come from the service itself.
const foreign = [];
page.on("request", (request) => {
  if (!request.url().startsWith(base)) foreign.push(request.url());
});
try {
  await page.goto(`${base}/docs/`);
  await page.locator(".swagger-ui .info .title", { hasText: "Task API" }).waitFor({ timeout: 20000 });

  // Authorize with the bearer token.
  await page.locator(".scheme-container button.authorize").click();
  await page.locator(".modal-ux input").first().fill(token);
  // The first scheme is bearerAuth (the second, eventTicket, is the event stream's).
  await page.locator(".modal-ux .auth-btn-wrapper button.authorize").first().click();
  await page.locator(".modal-ux button.btn-done").first().click();

  // Try "list tasks".
  const operation = page.locator("#operations-tasks-list_tasks");
  await operation.locator(".opblock-summary").click();
  await operation.locator("button.try-out__btn").click();
  await operation.locator('tr[data-param-name="user_id"] input').fill(user);
  await operation.locator("button.execute").click();
  const status = operation.locator(".live-responses-table .response .response-col_status").first();
  await status.waitFor({ timeout: 20000 });
  const code = (await status.innerText()).trim();
  const body = await operation.locator(".live-responses-table .response-col_description pre").first().innerText();
  await operation.scrollIntoViewIfNeeded();
  await page.screenshot({ path: screenshot, fullPage: true });

  const problems = [];
  if (code !== "200") problems.push(`status ${code}, expected 200`);
  if (!body.includes(title)) problems.push(`the response body does not show "${title}"`);
  if (foreign.length) problems.push(`requests outside the service: ${foreign.join(", ")}`);
  if (problems.length) {
    console.error(problems.join("\n"));
    process.exitCode = 1;
  } else {
    console.log(`ok: list tasks answered ${code} with "${title}"; screenshot at ${screenshot}`);
  }
} catch (error) {
  await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  console.error(`failed: ${error.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

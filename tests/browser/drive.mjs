// Drives Chromium through a SMART standalone launch (tests/browser.rs):
// opens the app's launch page, signs in on ehrx's sign-in page, picks a
// patient when asked, allows access, and waits for the app page to say
// "Ready" or "Error". Prints one JSON object: the final URL, the page text,
// and what the browser reported (console messages, failed requests).
//
// Usage: node drive.mjs '{"launch": URL, "username": …, "password": …,
//                         "patient": ID (optional), "chromium": PATH}'
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const opts = JSON.parse(process.argv[2]);
const STEP = 30_000;
const events = [];
let step = "starting Chromium";
setTimeout(() => {
  console.log(JSON.stringify({ ok: false, step: `${step} (overall timeout)`, events }));
  process.exit(2);
}, 150_000).unref();

const profile = mkdtempSync(join(tmpdir(), "ehrx-chromium-"));
let context;
let page;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 60_000,
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(STEP);
  page.on("console", (m) => events.push(`console ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => events.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) =>
    events.push(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`)
  );

  step = "opening the launch page";
  await page.goto(opts.launch);
  step = "waiting for ehrx's sign-in page";
  await page.locator("#username").waitFor();
  await page.locator("#username").fill(opts.username);
  await page.locator("#password").fill(opts.password);
  step = "signing in";
  await page.getByRole("button", { name: "Sign in" }).click();
  step = "waiting for the consent page";
  await page.getByRole("heading", { name: "Allow access" }).waitFor();
  if (opts.patient) {
    step = "picking the patient";
    await page.locator(`input[name="patient"][value="${opts.patient}"]`).check();
  }
  step = "allowing access";
  await page.getByRole("button", { name: "Allow" }).click();
  step = "waiting for the app page to load the record";
  await page.waitForFunction(() => {
    const s = document.getElementById("status");
    return s && (s.textContent === "Ready" || s.textContent.startsWith("Error"));
  });
  step = "done";
  console.log(
    JSON.stringify({
      ok: true,
      url: page.url(),
      text: await page.locator("body").innerText(),
      events,
    })
  );
} catch (e) {
  let url = null;
  let text = null;
  try {
    url = page?.url() ?? null;
    text = page ? await page.locator("body").innerText({ timeout: 2_000 }) : null;
  } catch {}
  console.log(JSON.stringify({ ok: false, step, error: String(e.message ?? e), url, text, events }));
} finally {
  await context?.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}

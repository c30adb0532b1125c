// Drive the pages in headless Chromium (playwright-core, with the system's chromium):
//   node headless.mjs demo PAGE_URL OUT_DIR   open the digit page, wait until it is ready, draw a stroke on
//       the pad, pick held-out digit 3; write OUT_DIR/page.json (what window.vqcoreDemo computed: every
//       held-out digit's tokens and Python's tokens decoded, the drawn 8x8 image and its tokens) and a
//       screenshot OUT_DIR/page.png
//   node headless.mjs bundle PAGE_URL         open run_bundle.html?..., wait for its "done: ..." title,
//       print its log; exit 0 when no case failed
// CHROMIUM (default /usr/bin/chromium) names the browser. Python checks the numbers:
// tests/test_consumer_js.py.

import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { chromium } from "playwright-core";

const TIMEOUT_MS = 120_000;
// no background traffic: the machine may have no network, and chromium retries its services endlessly
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const [mode, url, out] = process.argv.slice(2);
if (!["demo", "bundle"].includes(mode) || !url || (mode === "demo" && !out)) {
  console.error("usage: node headless.mjs demo PAGE_URL OUT_DIR | node headless.mjs bundle PAGE_URL");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: FLAGS,
});
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  const pageErrors = [];
  page.on("pageerror", (err) => pageErrors.push(String(err)));
  page.on("console", (message) => message.type() === "error" && pageErrors.push(message.text()));
  await page.goto(url);
  if (mode === "demo") {
    await page.waitForFunction(() => window.vqcoreDemo?.ready || window.vqcoreDemo?.error, null, {
      timeout: TIMEOUT_MS,
    });
    const error = await page.evaluate(() => window.vqcoreDemo.error);
    if (error) throw new Error(`the page failed: ${error}`);
    const summary = await page.evaluate(() => window.vqcoreDemo.summary);
    // a "7": a stroke across the top and down to the bottom left, through the pad's own pointer events
    const box = await page.locator("#pad").boundingBox();
    const stroke = [
      [0.25, 0.2],
      [0.75, 0.2],
      [0.6, 0.5],
      [0.45, 0.85],
    ];
    await page.mouse.move(box.x + stroke[0][0] * box.width, box.y + stroke[0][1] * box.height);
    await page.mouse.down();
    for (const [x, y] of stroke.slice(1)) {
      await page.mouse.move(box.x + x * box.width, box.y + y * box.height, { steps: 12 });
    }
    await page.mouse.up();
    await page.waitForFunction(() => window.vqcoreDemo.last?.title === "your drawing", null, {
      timeout: TIMEOUT_MS,
    });
    const drawn = await page.evaluate(() => window.vqcoreDemo.last);
    await page.locator("#thumbnails canvas").nth(3).click();
    await page.waitForFunction(() => window.vqcoreDemo.last?.title === "held-out digit 3", null, {
      timeout: TIMEOUT_MS,
    });
    await mkdir(out, { recursive: true });
    await page.screenshot({ path: path.join(out, "page.png"), fullPage: true });
    await writeFile(path.join(out, "page.json"), JSON.stringify({ summary, drawn, pageErrors }));
    console.log(`page ready: ${summary.images} images, ${summary.mismatches} token mismatches`);
  } else {
    await page.waitForFunction(() => /^(done|error):/.test(document.title), null, { timeout: TIMEOUT_MS });
    console.log((await page.locator("#log").textContent()).trimEnd());
    const title = await page.title();
    console.log(title);
    process.exitCode = /^done: \d+ ok, 0 failed$/.test(title) ? 0 : 1;
  }
} catch (err) {
  console.error(err.message);
  process.exitCode = 1;
} finally {
  await browser.close();
}

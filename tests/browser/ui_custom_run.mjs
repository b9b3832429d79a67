// Drives the Prefect UI in Debian's headless Chromium (playwright-core, no downloaded browser):
// Deployments → the deployment → Run → Custom run → change parameters in the form → Submit, then
// follows the flow run's page until it shows a final state. Launched by tests/test_browser_ui.py.
//
//   node ui_custom_run.mjs '{"uiUrl": "http://127.0.0.1:PORT", "deployment": "generate-nightly",
//                            "samples": 3, "limit": 2, "db": "/tmp/x.duckdb", "screenshots": "DIR"}'
//
// Prints `SUBMITTED {json}` as soon as the UI has created the flow run (its id and the parameters the
// UI sent), then `FINAL {json}` with the state the run page shows. Exits non-zero on any failure, and
// when the page tried to reach anything but the Prefect server (every other request is aborted).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const args = JSON.parse(process.argv[2]);
const origin = new URL(args.uiUrl).origin;
const chromiumPath = args.chromium || '/usr/bin/chromium';
const budgetMs = (args.budgetSeconds || 170) * 1000;
const finalStates = ['Completed', 'Failed', 'Crashed', 'Cancelled'];
fs.mkdirSync(args.screenshots, { recursive: true });

const log = (...parts) => console.error(`[ui ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...parts);
const started = Date.now();
const hardStop = setTimeout(() => { log(`over the ${budgetMs / 1000}s budget`); process.exit(3); }, budgetMs);

let shot = 0;
async function screenshot(page, name) {
  shot += 1;
  const file = path.join(args.screenshots, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file });
  log('screenshot', file);
  return file;
}

// One property of the schema form: the block around its label ("Samples (Optional)", "Limit", ...).
function field(page, label) {
  return page.getByText(new RegExp(`^${label}( \\(Optional\\))?$`))
    .locator('xpath=ancestor::div[contains(concat(" ", normalize-space(@class), " "), " schema-form-property ")][1]');
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: [
    '--no-sandbox',
    '--no-proxy-server',
    // Only the loopback server resolves; any other host name fails before a connection is tried.
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-domain-reliability',
    '--disable-sync',
    '--no-first-run',
    '--no-default-browser-check',
    '--metrics-recording-only',
  ],
});
const blocked = [];
const httpErrors = [];
let exitCode = 0;
const context = await browser.newContext({ viewport: { width: 1400, height: 1000 }, serviceWorkers: 'block' });
// Nothing leaves the machine: requests to anything but the Prefect server are aborted and reported.
await context.route('**/*', (route) => {
  const url = route.request().url();
  if (url.startsWith(origin + '/') || url.startsWith('data:') || url.startsWith('blob:')) return route.continue();
  blocked.push(url);
  return route.abort('blockedbyclient');
});
const page = await context.newPage();
page.setDefaultTimeout(30_000);
page.on('response', (r) => { if (r.status() >= 400) httpErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`); });
page.on('pageerror', (e) => log('page error:', e.message));

try {
  // 1. The deployments list, rendered by the Vue app from the API.
  await page.goto(`${origin}/deployments`, { waitUntil: 'networkidle' });
  const link = page.getByRole('link', { name: args.deployment, exact: true });
  await link.waitFor();
  await screenshot(page, 'deployments');

  // 2. The deployment's page.
  await link.click();
  await page.waitForURL('**/deployments/deployment/**');
  const run = page.getByRole('button', { name: 'Run', exact: true });
  await run.waitFor();
  await page.getByText(args.deployment, { exact: true }).first().waitFor();
  await screenshot(page, 'deployment');

  // 3. Run → Custom run.
  await run.click();
  const custom = page.getByRole('button', { name: 'Custom run', exact: true });
  await custom.waitFor();
  await screenshot(page, 'run-menu');
  await custom.click();
  await page.waitForURL('**/deployments/deployment/*/run**');
  const submit = page.getByRole('button', { name: 'Submit', exact: true });
  await submit.waitFor();
  const samples = field(page, 'Samples').getByRole('spinbutton');
  await samples.waitFor();
  await screenshot(page, 'custom-run-form');

  // 4. Change parameters in the form: samples, the limit (None → int), the database.
  const before = { samples: await samples.inputValue() };
  await samples.fill(String(args.samples));
  const limit = field(page, 'Limit');
  await limit.getByRole('button', { name: 'int', exact: true }).click();
  await limit.getByRole('spinbutton').fill(String(args.limit));
  const db = field(page, 'Db').getByRole('textbox');
  before.db = await db.inputValue();
  await db.fill(args.db);
  log('form before edits:', JSON.stringify(before));
  await limit.scrollIntoViewIfNeeded();
  await screenshot(page, 'form-edited');

  // 5. Submit: the UI posts the flow run to the API and goes back to the deployment, which lists it.
  const created = page.waitForResponse((r) => r.request().method() === 'POST' && r.url().endsWith('/create_flow_run'));
  await submit.click();
  const response = await created;
  const sent = response.request().postDataJSON();
  const body = await response.json();
  if (response.status() !== 201) throw new Error(`create_flow_run answered ${response.status()}: ${JSON.stringify(body)}`);
  console.log('SUBMITTED ' + JSON.stringify({ flow_run_id: body.id, name: body.name, parameters: sent.parameters, before }));
  await page.waitForURL((url) => /\/deployments\/deployment\/[^/]+$/.test(url.pathname));
  // The list leaves out Scheduled runs and does not refresh: reload until a worker has picked the run up.
  const runLink = page.getByRole('link', { name: body.name, exact: true }).first();
  for (let tries = 0; !(await runLink.isVisible()); tries++) {
    if (tries >= 30) throw new Error(`run ${body.name} never appeared on the deployment page`);
    await page.waitForTimeout(2000);
    await page.reload({ waitUntil: 'networkidle' });
  }
  await screenshot(page, 'submitted');

  // 6. The flow run's page, from the deployment's list of runs.
  await runLink.click();
  await page.waitForURL(`**/runs/flow-run/${body.id}**`);
  await page.getByText(body.name, { exact: true }).first().waitFor();
  await screenshot(page, 'flow-run');

  // 7. The run page until it shows a final state (the test checks the same through the API).
  const badge = page.locator('.state-badge').first();
  let state = '';
  while (!finalStates.includes(state)) {
    if (Date.now() - started > budgetMs - 15_000) throw new Error(`the run page still shows "${state}"`);
    await page.waitForTimeout(3000);
    await page.reload({ waitUntil: 'networkidle' });
    await badge.waitFor();
    state = (await badge.innerText()).trim();
    log('run page shows', JSON.stringify(state));
  }
  await page.getByText(body.name, { exact: true }).first().waitFor();
  await screenshot(page, 'flow-run-final');
  console.log('FINAL ' + JSON.stringify({ state }));
} catch (err) {
  exitCode = 1;
  log('FAILED:', err.stack || err);
  try { await screenshot(page, 'failure'); } catch { /* the page may be gone */ }
  try { fs.writeFileSync(path.join(args.screenshots, 'failure.html'), await page.content()); } catch { /* ditto */ }
}
if (blocked.length) {
  exitCode = exitCode || 2;
  log('requests to other hosts (aborted):', blocked.join(' '));
}
if (httpErrors.length) log('HTTP errors seen:', httpErrors.join(' | '));
await browser.close();
clearTimeout(hardStop);
process.exit(exitCode);

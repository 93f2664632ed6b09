// End-to-end check of the dashboard page (src/dashboard/index.html) in headless Chromium.
//
//   node browser.mjs <baseUrl> <adminToken> <viewerToken> <screenshotDir>
//
// Needs `npm ci` here (playwright-core) and Debian's chromium at /usr/bin/chromium (or $CHROMIUM).
// The server must be seeded with:
//   dash/orders: 3 ready messages {"n": 1}, {"n": 2}, {"n": 3}; options include lease = 30s, max_attempts = 5
//   dash/mail:   3 dead letters: 2 × "smtp down (attempt 1 of 1)" ({"to": "a@x"}, {"to": "b@x"}),
//                1 × "bad address (attempt 1 of 1)" ({"to": "c@x"}); nothing pending
// It changes that data (redrive, produce, pause/resume). Prints `ok - <step>` per step, and
// `not ok - <step>: <details>` then exits 1 on the first failure (after saving failure-N.png of
// each open page in <screenshotDir>); the browser is always closed.
//
// data-testid values of the page that this script relies on (others exist, see index.html):
//   header:     role-badge (data-role="admin"|"viewer"; text "admin" or "read-only"), nav-overview,
//               nav-produce, notice (result of an action), error (API errors)
//   token form: token-form, token-input, token-submit
//   overview:   channel-row (data-channel=<name>) with cells ready, delayed, in-flight, dead
//               (dead-link inside when > 0), oldest-ready, rate-produced, rate-acked, rate-failed,
//               latency-p50, latency-p95, state; channel-link; counted-since
//   channel:    channel-name, channel-state ("paused"|"active"), pause, resume, options-table,
//               option-row (data-key), options-empty, counters, pending-row (data-id) with
//               message-id and payload, message-detail, history-item (data-event), history-event,
//               cancel-message, dead-letters-link
//   dead:       dead-group (data-error) with group-error, group-count, group-last; redrive-group,
//               purge-group, redrive-all, purge-all, group-letters, dead-letter (data-id),
//               redrive-letter, purge-letter, dead-total, dead-empty
//   confirm:    confirm-box, confirm, back (the in-page confirmation of every destructive action)
//   produce:    produce-form, produce-channel, produce-payload, produce-delay, produce-priority,
//               produce-submit (admin only), produce-payload-error, produce-form-error, produce-readonly

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const WAIT_MS = 10_000;        // one wait or action
const STEP_TIMEOUT_MS = 20_000; // one whole step (a few waits)

const [baseArg, adminToken, viewerToken, shotDir] = process.argv.slice(2);
if (!baseArg || !adminToken || !viewerToken || !shotDir) {
  console.error('usage: node browser.mjs <baseUrl> <adminToken> <viewerToken> <screenshotDir>');
  process.exit(2);
}
const base = baseArg.replace(/\/+$/, '');
const origin = new URL(base).origin;
fs.mkdirSync(shotDir, { recursive: true });

const ORDERS = 'dash/orders';
const MAIL = 'dash/mail';
const SMTP = 'smtp down (attempt 1 of 1)';
const BAD = 'bad address (attempt 1 of 1)';

let browser;
const problems = []; // page errors and requests leaving the server's origin

// ---------- helpers ----------

/** Runs one step with a deadline; prints ok / not ok; a failure ends the run. */
async function step(name, fn, timeoutMs = STEP_TIMEOUT_MS) {
  let timer;
  try {
    await Promise.race([
      fn(),
      new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms`)), timeoutMs); }),
    ]);
    if (problems.length) throw new Error(problems.join('; '));
    console.log(`ok - ${name}`);
  } catch (e) {
    const details = String(e && e.message ? e.message : e).split('\n').slice(0, 6).join(' | ');
    console.log(`not ok - ${name}: ${details}`);
    await failureShots();
    await finish(1);
  } finally {
    clearTimeout(timer);
  }
}

async function failureShots() {
  if (!browser) return;
  const pages = browser.contexts().flatMap(c => c.pages());
  for (const [i, page] of pages.entries()) {
    await page.screenshot({ path: path.join(shotDir, `failure-${i + 1}.png`), fullPage: true, timeout: 5000 }).catch(() => {});
  }
}

async function finish(code) {
  if (browser) await browser.close().catch(() => {});
  process.exit(code);
}

/** Polls `probe` until it returns a truthy value; fails with `what` and the last value seen. */
async function until(what, probe, timeoutMs = WAIT_MS) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last && last.ok !== false) return last;
    } catch (e) { last = e.message; }
    if (Date.now() > end) throw new Error(`${what} (last seen: ${JSON.stringify(last && last.seen !== undefined ? last.seen : last)})`);
    await new Promise(r => setTimeout(r, 100));
  }
}

/** Waits until the text of `locator` (trimmed) satisfies `want` (a string or a RegExp). */
async function textIs(locator, want, what) {
  return until(what, async () => {
    const text = ((await locator.first().textContent({ timeout: 1000 })) || '').trim();
    return { ok: want instanceof RegExp ? want.test(text) : text === want, seen: text };
  });
}

async function count(locator, n, what) {
  return until(what, async () => { const c = await locator.count(); return { ok: c === n, seen: c }; });
}

function sel(testid, attr, value) {
  return `[data-testid="${testid}"]` + (attr ? `[${attr}=${JSON.stringify(value)}]` : '');
}
const row = (page, channel) => page.locator(sel('channel-row', 'data-channel', channel));
const group = (page, error) => page.locator(sel('dead-group', 'data-error', error));

async function shot(page, name) {
  await page.screenshot({ path: path.join(shotDir, name), fullPage: true });
}

/** Navigates within the page by its hash (same document, keeps sessionStorage). */
async function go(page, hash) {
  await page.evaluate((h) => { location.hash = h; }, hash);
  await until(`address ends with ${hash}`, () => page.url().endsWith(hash));
}

/** Calls the API from inside the page with an explicit token; answers {status, doc}. */
async function apiCall(page, token, method, apiPath, body) {
  return page.evaluate(async ({ token, method, apiPath, body }) => {
    const init = { method, headers: { Authorization: 'Bearer ' + token } };
    if (body !== undefined) { init.headers['Content-Type'] = 'application/json'; init.body = JSON.stringify(body); }
    const res = await fetch(apiPath, init);
    const text = await res.text();
    let doc = null;
    try { doc = JSON.parse(text); } catch (e) { doc = text; }
    return { status: res.status, doc };
  }, { token, method, apiPath, body });
}

async function overviewRow(page, token, channel) {
  const r = await apiCall(page, token, 'GET', '/api/overview');
  if (r.status !== 200) throw new Error(`GET /api/overview answered ${r.status}: ${JSON.stringify(r.doc)}`);
  const found = r.doc.channels.find(c => c.channel === channel);
  if (!found) throw new Error(`GET /api/overview has no ${channel}`);
  return found;
}

async function newPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('request', (req) => {
    const u = req.url();
    if (!u.startsWith('data:') && new URL(u).origin !== origin) problems.push(`request outside the server: ${u}`);
  });
  return page;
}

// ---------- run ----------

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
let admin;

await step('launch chromium', async () => {
  browser = await chromium.launch({
    executablePath,
    headless: true,
    timeout: 30_000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1360, height: 860 } });
  admin = await newPage(context);
}, 40_000);

await step('overview with the admin token', async () => {
  await admin.goto(`${base}/?token=${encodeURIComponent(adminToken)}`);
  await row(admin, ORDERS).waitFor();
  await row(admin, MAIL).waitFor();
  await textIs(row(admin, ORDERS).locator(sel('ready')), '3', `${ORDERS} ready = 3`);
  await textIs(row(admin, MAIL).locator(sel('dead')), '3', `${MAIL} dead = 3`);
  await until('token gone from the address bar', () => ({ ok: !admin.url().includes('token'), seen: admin.url() }));
  const badge = admin.locator(sel('role-badge'));
  await until('role badge says admin', async () => ({
    ok: (await badge.isVisible()) && (await badge.getAttribute('data-role')) === 'admin' && !/read-only/i.test(await badge.textContent()),
    seen: await badge.textContent() }));
  await textIs(admin.locator(sel('counted-since')), /counters since \d{4}-\d\d-\d\d/, 'counters since shown');
  await shot(admin, 'overview.png');
});

await step(`channel page of ${ORDERS}`, async () => {
  await row(admin, ORDERS).locator(sel('channel-link')).click();
  await until('address is the channel page', () => admin.url().endsWith('#/channel/' + encodeURIComponent(ORDERS)));
  await textIs(admin.locator(sel('channel-name')), ORDERS, 'channel heading');
  await textIs(admin.locator(sel('option-row', 'data-key', 'lease')), /lease\s*30s/, 'option lease = 30s');
  await textIs(admin.locator(sel('option-row', 'data-key', 'max_attempts')), /max_attempts\s*5/, 'option max_attempts = 5');
  const rows = admin.locator(sel('pending-row'));
  await count(rows, 3, '3 pending rows');
  const payloads = (await rows.locator(sel('payload')).allTextContents()).join('\n');
  for (const n of [1, 2, 3]) {
    if (!payloads.includes(`"n": ${n}`)) throw new Error(`no pending payload with "n": ${n} in ${JSON.stringify(payloads)}`);
  }
  const firstId = await rows.first().getAttribute('data-id');
  await rows.first().click();
  const detail = admin.locator(sel('message-detail'));
  await until('detail of the first message', async () => ({ ok: (await detail.getAttribute('data-id')) === firstId, seen: await detail.getAttribute('data-id') }));
  const produced = detail.locator(sel('history-item', 'data-event', 'produced'));
  await produced.waitFor();
  await textIs(produced.locator(sel('history-event')), 'produced', 'history shows produced');
  await detail.locator(sel('cancel-message')).waitFor();
  await shot(admin, 'channel.png');
});

await step(`dead letters of ${MAIL}`, async () => {
  await go(admin, '#/dead/' + encodeURIComponent(MAIL));
  await count(admin.locator(sel('dead-group')), 2, 'two dead-letter groups');
  await textIs(group(admin, SMTP).locator(sel('group-count')), '2', 'smtp group count = 2');
  await textIs(group(admin, BAD).locator(sel('group-count')), '1', 'bad address group count = 1');
  await count(admin.locator(sel('dead-letter')), 3, 'three letters listed');
  await shot(admin, 'dead.png');
});

await step('a confirmation can be taken back', async () => {
  await group(admin, BAD).locator(sel('purge-group')).click();
  await admin.locator(sel('confirm')).waitFor();
  await count(group(admin, BAD).locator(sel('purge-group')), 0, 'the purge button became a confirmation');
  await admin.locator(sel('back')).click();
  await group(admin, BAD).locator(sel('purge-group')).waitFor();
  await count(admin.locator(sel('confirm')), 0, 'no confirmation left');
  await count(admin.locator(sel('dead-letter')), 3, 'nothing purged');
});

await step('redrive the smtp group', async () => {
  await group(admin, SMTP).locator(sel('redrive-group')).click();
  await textIs(admin.locator(sel('confirm-box')), /really redrive 2/i, 'the confirmation asks');
  await shot(admin, 'confirm.png');
  await admin.locator(sel('confirm')).click();
  await textIs(admin.locator(sel('notice')), /moved 2\b/, 'notice says moved 2');
  await count(admin.locator(sel('dead-group')), 1, 'one group left');
  await textIs(admin.locator(sel('dead-group')).locator(sel('group-error')), BAD, 'the group left is bad address');
  await textIs(admin.locator(sel('dead-group')).locator(sel('group-count')), '1', 'its count is 1');
  await shot(admin, 'redriven.png');
});

await step('the redrive moved the messages', async () => {
  await admin.locator(sel('nav-overview')).click();
  await textIs(row(admin, MAIL).locator(sel('ready')), '2', `${MAIL} ready = 2 on the overview`);
  await textIs(row(admin, MAIL).locator(sel('dead')), '1', `${MAIL} dead = 1 on the overview`);
  const api = await overviewRow(admin, adminToken, MAIL);
  if (api.ready !== 2 || api.dead !== 1) throw new Error(`API says ready ${api.ready}, dead ${api.dead}`);
});

let producedId;
await step(`produce into ${ORDERS}`, async () => {
  await admin.locator(sel('nav-produce')).click();
  await admin.locator(sel('produce-payload')).waitFor();
  await admin.locator(sel('produce-channel')).fill(ORDERS);
  await admin.locator(sel('produce-payload')).fill('{"n": 99,');
  await admin.locator(sel('produce-submit')).click();
  await textIs(admin.locator(sel('produce-payload-error')), /JSON/i, 'a bad payload shows its parse error');
  if (await admin.locator(sel('notice')).isVisible()) throw new Error('a bad payload was sent');
  await admin.locator(sel('produce-payload')).fill('{"n": 99}');
  await admin.locator(sel('produce-submit')).click();
  const text = await textIs(admin.locator(sel('notice')), /produced message \d+/, 'notice shows the produced id');
  producedId = text.seen.match(/produced message (\d+)/)[1];
  if (await admin.locator(sel('produce-payload-error')).isVisible()) throw new Error('the parse error is still shown');
  await shot(admin, 'produce.png');
  await admin.locator(sel('nav-overview')).click();
  await textIs(row(admin, ORDERS).locator(sel('ready')), '4', `${ORDERS} ready = 4 on the overview`);
  await go(admin, '#/channel/' + encodeURIComponent(ORDERS));
  await textIs(admin.locator(sel('pending-row', 'data-id', producedId)).locator(sel('payload')), /"n": 99/, `message ${producedId} is pending with its payload`);
});

await step(`pause and resume ${ORDERS}`, async () => {
  await textIs(admin.locator(sel('channel-state')), 'active', 'state is active');
  await admin.locator(sel('pause')).click();
  await textIs(admin.locator(sel('channel-state')), 'paused', 'state shows paused');
  await textIs(admin.locator(sel('notice')), /paused/, 'notice says paused');
  const paused = await apiCall(admin, adminToken, 'GET', '/api/channel?name=' + encodeURIComponent(ORDERS));
  if (paused.doc.stats.paused !== true) throw new Error('the API does not say paused');
  await admin.locator(sel('resume')).click();
  await textIs(admin.locator(sel('channel-state')), 'active', 'state is active again');
  await admin.locator(sel('pause')).waitFor();
  const resumed = await apiCall(admin, adminToken, 'GET', '/api/channel?name=' + encodeURIComponent(ORDERS));
  if (resumed.doc.stats.paused !== false) throw new Error('the API does not say resumed');
});

await step('no API error shown to the admin', async () => {
  if (await admin.locator(sel('error')).isVisible()) throw new Error(await admin.locator(sel('error')).textContent());
});

let viewer;
await step('viewer sees a read-only badge', async () => {
  const context = await browser.newContext({ viewport: { width: 1360, height: 860 } });
  viewer = await newPage(context);
  await viewer.goto(`${base}/?token=${encodeURIComponent(viewerToken)}`);
  await row(viewer, MAIL).waitFor();
  const badge = viewer.locator(sel('role-badge'));
  await badge.waitFor({ state: 'visible' });
  await textIs(badge, /read-only/i, 'badge says read-only');
  if ((await badge.getAttribute('data-role')) !== 'viewer') throw new Error('badge data-role is not viewer');
});

await step('viewer has no actions on dead letters', async () => {
  await go(viewer, '#/dead/' + encodeURIComponent(MAIL));
  await count(viewer.locator(sel('dead-group')), 1, 'one group shown');
  await count(viewer.locator(sel('dead-letter')), 1, 'its letter is listed');
  for (const id of ['redrive-group', 'purge-group', 'redrive-all', 'purge-all', 'redrive-letter', 'purge-letter']) {
    await count(viewer.locator(sel(id)), 0, `no ${id} button`);
  }
  await shot(viewer, 'viewer.png');
});

await step('viewer has no actions on the channel and produce pages', async () => {
  await go(viewer, '#/channel/' + encodeURIComponent(ORDERS));
  await viewer.locator(sel('pending-row')).first().click();
  await viewer.locator(sel('history-item')).first().waitFor();
  for (const id of ['pause', 'resume', 'cancel-message']) await count(viewer.locator(sel(id)), 0, `no ${id} button`);
  await go(viewer, '#/produce');
  await viewer.locator(sel('produce-payload')).waitFor();
  const submit = viewer.locator(sel('produce-submit'));
  if ((await submit.count()) > 0 && !(await submit.isDisabled())) throw new Error('the produce submit is usable');
});

await step('the API refuses a viewer redrive with 403', async () => {
  const r = await apiCall(viewer, viewerToken, 'POST', '/api/redrive', { channel: MAIL, ids: null });
  if (r.status !== 403) throw new Error(`answered ${r.status}: ${JSON.stringify(r.doc)}`);
  if (!r.doc || typeof r.doc.error !== 'string') throw new Error(`403 without {"error"}: ${JSON.stringify(r.doc)}`);
  const mail = await overviewRow(viewer, viewerToken, MAIL);
  if (mail.dead !== 1) throw new Error(`${MAIL} dead = ${mail.dead} after the refused redrive`);
});

await step('a wrong token shows the token form', async () => {
  const context = await browser.newContext({ viewport: { width: 1360, height: 860 } });
  const page = await newPage(context);
  await page.goto(`${base}/?token=nope`);
  await page.locator(sel('token-form')).waitFor({ state: 'visible' });
  if (page.url().includes('nope')) throw new Error('the token stayed in the address bar');
  await count(page.locator(sel('channel-row')), 0, 'no channel rows');
  await shot(page, 'token.png');
  await page.locator(sel('token-input')).fill(viewerToken);
  await page.locator(sel('token-submit')).click();
  await row(page, ORDERS).waitFor();
  await textIs(page.locator(sel('role-badge')), /read-only/i, 'the entered token is used');
});

await finish(0);

'use strict';
// Drives the agent's inspector page in headless Chromium while real traffic goes through a
// tunnel: the page must show it live (no reload), show headers on click, replay a request,
// and count a WebSocket session's messages each way and its close code.
//
//   NODE_PATH=tests/clients/node_modules node tests/inspector/inspector.test.js \
//     --inspector http://127.0.0.1:PORT --web http://web.localhost:PORT \
//     --ws ws://sock.localhost:PORT/chat [--screenshot docs/inspector.png] [--chromium PATH]
//
// Prints `OK inspector …` and exits 0 when every step passed; prints the failure and exits 1.
const path = require('node:path');
const { parseArgs } = require('node:util');

function loadPlaywright() {
  try {
    return require('playwright-core');
  } catch {
    return require(path.join(__dirname, '../clients/node_modules/playwright-core'));
  }
}
const { chromium } = loadPlaywright();

const LAUNCH_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
/** How long one step may wait for the page. */
const STEP_MS = 20_000;

const { values: args } = parseArgs({
  options: {
    inspector: { type: 'string' },
    web: { type: 'string' },
    ws: { type: 'string' },
    screenshot: { type: 'string' },
    chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' },
  },
});
for (const k of ['inspector', 'web', 'ws']) {
  if (!args[k]) {
    console.error(`--${k} is required`);
    process.exit(2);
  }
}

function step(name) {
  console.error(`step: ${name}`);
}

async function main() {
  const browser = await chromium.launch({ executablePath: args.chromium, args: LAUNCH_ARGS });
  try {
    const inspector = await browser.newPage({ viewport: { width: 1440, height: 900 } });
    let reloads = 0;
    inspector.on('framenavigated', (f) => { if (f === inspector.mainFrame()) reloads += 1; });
    step('open the inspector');
    await inspector.goto(args.inspector, { waitUntil: 'load' });
    await inspector.locator('#live:not(.off)').waitFor({ timeout: STEP_MS });
    const navigations = reloads;

    step('a visitor request appears without reloading');
    const visitor = await browser.newPage();
    const r = await visitor.goto(`${args.web}/hello?from=chromium`);
    if (!r || r.status() !== 200) throw new Error(`visitor got ${r && r.status()}`);
    const row = inspector.locator('tr.row', { hasText: '/hello?from=chromium' }).first();
    await row.waitFor({ timeout: STEP_MS });
    await inspector.locator('tr.row', { hasText: '/hello?from=chromium' }).first()
      .locator('.st.s2').waitFor({ timeout: STEP_MS });

    step('clicking it shows its headers');
    await row.click();
    const detail = inspector.locator('#detail');
    await detail.locator('h3', { hasText: 'Request headers' }).waitFor({ timeout: STEP_MS });
    await detail.locator('table.kv td', { hasText: 'user-agent' }).first().waitFor({ timeout: STEP_MS });
    await detail.locator('table.kv td', { hasText: 'HeadlessChrome' }).first().waitFor({ timeout: STEP_MS });

    step('replay sends it to the local server again');
    await detail.locator('#replay').click();
    await inspector.locator('#toast', { hasText: 'Replayed as #' }).waitFor({ timeout: STEP_MS });
    await inspector.locator('tr.row', { hasText: 'replay' }).first().waitFor({ timeout: STEP_MS });

    step('more traffic for a realistic list');
    await visitor.evaluate(async () => {
      const post = (p, body) => fetch(p, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      await post('/webhooks/github?delivery=72d3162e', { action: 'opened', number: 1347, pull_request: { title: 'Add inspector', user: { login: 'octocat' } } });
      await post('/api/orders', { sku: 'BRW-001', quantity: 2 });
      await fetch('/static/app.css');
    });

    step('a WebSocket session: 3 messages each way, then the close code');
    await visitor.evaluate(async (url) => {
      const ws = new WebSocket(url, ['chat.v1']);
      window.inspectorWs = ws;
      await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error('ws error')); });
      let got = 0;
      const echoed = new Promise((ok) => { ws.onmessage = () => { got += 1; if (got === 3) ok(); }; });
      for (const m of ['{"type":"join","room":"lobby"}', '{"type":"say","text":"hello"}', '{"type":"typing"}']) ws.send(m);
      await echoed;
    }, args.ws);
    const wsRow = inspector.locator('tr.row[data-kind="ws"]').first();
    await wsRow.waitFor({ timeout: STEP_MS });
    await wsRow.click();
    await inspector.locator('#ws-in', { hasText: /^3$/ }).waitFor({ timeout: STEP_MS });
    await inspector.locator('#ws-out', { hasText: /^3$/ }).waitFor({ timeout: STEP_MS });
    await inspector.locator('#ws-state', { hasText: 'open' }).waitFor({ timeout: STEP_MS });
    await visitor.evaluate(() => new Promise((ok) => {
      window.inspectorWs.onclose = ok;
      window.inspectorWs.close(4000, 'user left');
    }));
    await inspector.locator('#ws-close', { hasText: '4000' }).waitFor({ timeout: STEP_MS });
    await inspector.locator('#ws-state', { hasText: 'closed' }).waitFor({ timeout: STEP_MS });
    await inspector.locator('tr.row[data-kind="ws"] .st', { hasText: 'closed 4000' }).first().waitFor({ timeout: STEP_MS });

    if (reloads !== navigations) throw new Error(`the inspector page navigated ${reloads - navigations} time(s)`);

    if (args.screenshot) {
      step('screenshot');
      const hook = inspector.locator('tr.row', { hasText: '/webhooks/github' }).first();
      await hook.click();
      await detail.locator('pre', { hasText: '"octocat"' }).waitFor({ timeout: STEP_MS });
      await inspector.screenshot({ path: args.screenshot });
      await wsRow.click();
      await inspector.locator('#ws-close', { hasText: '4000' }).waitFor({ timeout: STEP_MS });
      const wsShot = args.screenshot.replace(/\.png$/, '-websocket.png');
      await inspector.screenshot({ path: wsShot });
    }
    console.log('OK inspector: live row, headers, replay, WebSocket 3 in / 3 out, close 4000');
  } finally {
    await browser.close();
  }
}

const timer = setTimeout(() => {
  console.error('the inspector test timed out');
  process.exit(1);
}, 120_000);
main().then(() => { clearTimeout(timer); process.exit(0); }, (e) => {
  console.error(`FAIL inspector: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});

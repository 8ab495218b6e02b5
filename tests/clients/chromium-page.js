'use strict';
// Loads the Express + ws page in headless Chromium and waits for the echo to appear in the DOM.
// Chromium resolves `NAME.localhost` to loopback by itself, so the URL is used as given; with
// --connect, every host is mapped to that address instead. An https:// page is accepted only
// with the certificate in --ca (by its public key), not with certificate errors ignored.
//
//   node chromium-page.js http://NAME.localhost:PORT/ [--chromium /usr/bin/chromium] [--ca FILE]
const crypto = require('node:crypto');
const fs = require('node:fs');
const { chromium } = require('playwright-core');
const { runClient, expectEqual } = require('./lib/client');

const LAUNCH_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

/** Base64 SHA-256 of the certificate's SubjectPublicKeyInfo, the form Chromium's list wants. */
function spkiHash(pemFile) {
  const cert = new crypto.X509Certificate(fs.readFileSync(pemFile));
  const spki = cert.publicKey.export({ type: 'spki', format: 'der' });
  return crypto.createHash('sha256').update(spki).digest('base64');
}

runClient(
  'chromium-page',
  { chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' } },
  async ({ url, dial, args }) => {
    const extra = [];
    if (args.connect) extra.push(`--host-resolver-rules=MAP * ${dial.host}:${dial.port}`);
    if (args.ca) extra.push(`--ignore-certificate-errors-spki-list=${spkiHash(args.ca)}`);
    const browser = await chromium.launch({
      executablePath: args.chromium,
      args: [...LAUNCH_ARGS, ...extra],
    });
    try {
      const page = await browser.newPage();
      const response = await page.goto(url.href, { waitUntil: 'load' });
      expectEqual('page status', response && response.status(), 200);
      const expected = `Echo: hello from ${url.host}`;
      const echo = page.locator('#echo');
      try {
        await echo.filter({ hasText: expected }).waitFor({ timeout: 15_000 });
      } catch {
        const status = await page.locator('#status').textContent();
        throw new Error(`"${expected}" never appeared (status: ${status}, echo: "${await echo.textContent()}")`);
      }
      expectEqual('echo in the DOM', await echo.textContent(), expected);
      return `page ${url.host} loaded, its WebSocket echoed "${expected}" into the DOM`;
    } finally {
      await browser.close();
    }
  },
);

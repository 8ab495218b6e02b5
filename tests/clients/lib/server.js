'use strict';
// Plumbing shared by the Node server scripts: announce the port, and never outlive the test.
//
// A server prints `LISTENING <port>` as its first stdout line once it accepts connections.
// It exits when its stdin is a pipe that closes (the Rust tests hold that pipe, so a killed or
// crashed test takes its servers with it) and in any case after MAX_LIFETIME_MS.

const fs = require('node:fs');

/** Upper bound on a server's life, so a forgotten one cannot linger on a CI machine. */
const MAX_LIFETIME_MS = 10 * 60_000;

function announce(port) {
  process.stdout.write(`LISTENING ${port}\n`);
}

function exitWithParent() {
  setTimeout(() => process.exit(0), MAX_LIFETIME_MS).unref();
  if (fs.fstatSync(0).isFIFO()) {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
  }
}

module.exports = { announce, exitWithParent };

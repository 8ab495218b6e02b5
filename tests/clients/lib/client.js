'use strict';
// Plumbing shared by the Node client scripts: argument parsing, dialling 127.0.0.1 while the
// request still names the visitor's host (`Host: NAME.localhost:PORT`, as DESIGN.md's local
// development notes ask), an overall deadline, and the one-line verdict the Rust tests read.
//
// Every client is run as
//   node <script> <url> [--connect HOST:PORT] [--ca FILE] [--timeout-ms N] [...]
// `wss://` and `https://` URLs are served over TLS checked against `--ca` (a PEM file, e.g.
// the edge's self-signed certificate) with the URL's host as the server name.
// It prints `OK <scenario> <summary>` and exits 0, or `FAIL <scenario>: <reason>` on stderr
// and exits 1. It never outlives its deadline.

const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const net = require('node:net');
const tls = require('node:tls');
const util = require('node:util');
const WebSocket = require('ws');

/** How long a client may take before it gives up, unless `--timeout-ms` says otherwise. */
const DEFAULT_TIMEOUT_MS = 20_000;

/**
 * An http.Agent that opens every connection to one fixed address. glibc does not resolve
 * `NAME.localhost`, so the clients dial the edge directly; because only the socket changes,
 * the URL's host still goes out in the `Host` header (and in socket.io's polling requests,
 * which go through the same agent).
 */
class LoopbackAgent extends http.Agent {
  constructor(dial) {
    super({ keepAlive: true });
    this.dial = dial;
  }

  createConnection(_options, _callback) {
    return net.connect({ host: this.dial.host, port: this.dial.port });
  }
}

/** The same over TLS, verifying the certificate for the URL's host against `ca`. */
class LoopbackTlsAgent extends https.Agent {
  constructor(dial, servername, ca) {
    super({ keepAlive: true });
    this.dial = dial;
    this.servername = servername;
    this.ca = ca;
  }

  createConnection(_options, _callback) {
    return tls.connect({
      host: this.dial.host,
      port: this.dial.port,
      servername: this.servername,
      ca: this.ca,
      ALPNProtocols: ['http/1.1'],
    });
  }
}

function parseDial(text) {
  const m = /^(.+):(\d+)$/.exec(text);
  if (!m) throw new Error(`--connect wants HOST:PORT, got ${JSON.stringify(text)}`);
  return { host: m[1].replace(/^\[(.*)\]$/, '$1'), port: Number(m[2]) };
}

function defaultPort(url) {
  if (url.port) return Number(url.port);
  return url.protocol === 'wss:' || url.protocol === 'https:' ? 443 : 80;
}

/**
 * Runs one client scenario. `options` are extra util.parseArgs options; `body` gets
 * `{ url, dial, agent, args }` and resolves to the summary printed after `OK <scenario>`.
 */
function runClient(scenario, options, body) {
  const fail = (reason) => {
    const text = reason instanceof Error ? reason.message : String(reason);
    process.stderr.write(`FAIL ${scenario}: ${text}\n`);
    process.exit(1);
  };

  let parsed;
  try {
    parsed = util.parseArgs({
      options: {
        ...options,
        connect: { type: 'string' },
        ca: { type: 'string' },
        'timeout-ms': { type: 'string' },
      },
      allowPositionals: true,
    });
    if (parsed.positionals.length !== 1) {
      throw new Error('usage: <url> [--connect HOST:PORT] [--ca FILE] [--timeout-ms N]');
    }
  } catch (err) {
    fail(err);
    return;
  }

  const { values: args, positionals } = parsed;
  const timeoutMs = Number(args['timeout-ms'] ?? DEFAULT_TIMEOUT_MS);
  if (!(timeoutMs > 0)) {
    fail(`--timeout-ms wants a positive number of milliseconds, got ${args['timeout-ms']}`);
    return;
  }
  // Not unref'd: the process lives until a verdict, so it can never end silently.
  setTimeout(() => fail(`no verdict within ${timeoutMs} ms`), timeoutMs);

  let url;
  let dial;
  let agent;
  try {
    url = new URL(positionals[0]);
    dial = args.connect ? parseDial(args.connect) : { host: '127.0.0.1', port: defaultPort(url) };
    const secure = url.protocol === 'wss:' || url.protocol === 'https:';
    agent = secure
      ? new LoopbackTlsAgent(dial, url.hostname, args.ca ? fs.readFileSync(args.ca) : undefined)
      : new LoopbackAgent(dial);
  } catch (err) {
    fail(err);
    return;
  }
  process.on('uncaughtException', fail);
  Promise.resolve()
    .then(() => body({ url, dial, agent, args }))
    .then((summary) => {
      process.stdout.write(`OK ${scenario} ${summary}\n`);
      process.exit(0);
    }, fail);
}

/**
 * Opens a `ws` WebSocket through `agent`; resolves once open, rejects with the status line if
 * the server answers the upgrade with anything but 101.
 */
function openWebSocket(url, agent, protocols = [], options = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols, { agent, ...options });
    const inbox = new Inbox(ws);
    ws.once('open', () => resolve({ ws, inbox }));
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) =>
      reject(new Error(`upgrade answered ${res.statusCode} ${res.statusMessage}, not 101`)));
  });
}

/**
 * Collects a WebSocket's messages as they arrive, so a test can `await inbox.next()` without
 * racing the 'message' event. A close or error while waiting rejects with what happened.
 */
class Inbox {
  constructor(ws) {
    this.queue = [];
    this.waiters = [];
    this.ended = null;
    ws.on('message', (data, isBinary) => this.push({ data, isBinary }));
    ws.on('close', (code, reason) =>
      this.end(new Error(`connection closed (${code} ${reason}) while a message was expected`)));
    ws.on('error', (err) => this.end(err));
  }

  push(message) {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(message);
    else this.queue.push(message);
  }

  end(err) {
    this.ended = this.ended ?? err;
    for (const waiter of this.waiters.splice(0)) waiter.reject(this.ended);
  }

  /** The next message: `{ data: Buffer, isBinary: boolean }`. */
  next() {
    if (this.queue.length > 0) return Promise.resolve(this.queue.shift());
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }
}

/** Closes `ws` with `code` and resolves with the code the peer answered in its close frame. */
function closeWebSocket(ws, code = 1000, reason = 'done') {
  return new Promise((resolve) => {
    ws.once('close', (peerCode) => resolve(peerCode));
    ws.close(code, reason);
  });
}

/** Throws a readable error unless `actual` equals `expected` (strings shortened for display). */
function expectEqual(what, actual, expected) {
  if (actual === expected) return;
  const show = (v) => {
    const s = JSON.stringify(v);
    return s.length > 120 ? `${s.slice(0, 100)}… (${s.length} chars)` : s;
  };
  throw new Error(`${what}: expected ${show(expected)}, got ${show(actual)}`);
}

module.exports = {
  runClient, openWebSocket, closeWebSocket, expectEqual, Inbox, LoopbackAgent, LoopbackTlsAgent,
};

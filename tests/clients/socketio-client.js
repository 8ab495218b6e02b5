'use strict';
// socket.io-client against the Socket.io server, in one of two modes:
//   default   — the library's default transports: it opens with HTTP long-polling, then
//               upgrades to WebSocket. Checks the session opened on polling, the upgrade to
//               'websocket' happened, and an emit/response round trip after it.
//   websocket — `transports: ['websocket']`: checks the first transport is already WebSocket.
// Both modes end with a 100 KB binary payload (a Buffer, sent as a Socket.io attachment) that
// must come back byte for byte.
//
//   node socketio-client.js http://NAME.localhost:PORT/ [--transports default|websocket]
//
// Every request, polling and upgrade alike, goes through the same agent, so it dials
// 127.0.0.1 while carrying `Host: NAME.localhost:PORT`.
const crypto = require('node:crypto');
const { io } = require('socket.io-client');
const { runClient, expectEqual } = require('./lib/client');

function roundTrip(socket, text) {
  return new Promise((resolve, reject) => {
    socket.once('response', (reply) => resolve(reply));
    socket.once('disconnect', (reason) => reject(new Error(`disconnected: ${reason}`)));
    socket.emit('message', text);
  });
}

function waitFor(emitter, event, what) {
  return new Promise((resolve, reject) => {
    emitter.once(event, resolve);
    emitter.once('connect_error', (err) => reject(new Error(`${what}: ${err.message}`)));
  });
}

runClient(
  'socketio',
  { transports: { type: 'string', default: 'default' } },
  async ({ url, agent, args }) => {
    const mode = args.transports;
    if (mode !== 'default' && mode !== 'websocket') {
      throw new Error(`--transports wants default or websocket, got ${mode}`);
    }
    const socket = io(url.href, {
      agent,
      reconnection: false,
      ...(mode === 'websocket' ? { transports: ['websocket'] } : {}),
    });
    try {
      // Both listeners go on before anything is sent: the upgrade can finish before 'connect'.
      const opened = new Promise((resolve) => socket.io.once('open', () => {
        const transport = socket.io.engine.transport.name;
        const upgraded = new Promise((done) =>
          socket.io.engine.once('upgrade', (t) => done(t.name)));
        resolve({ transport, upgraded });
      }));
      await waitFor(socket, 'connect', 'connect');
      const { transport: first, upgraded } = await opened;
      expectEqual('first transport', first, mode === 'websocket' ? 'websocket' : 'polling');
      let summary;
      if (mode === 'websocket') {
        const reply = await roundTrip(socket, 'hello over websocket');
        expectEqual('response', reply.received, 'hello over websocket');
        summary = 'connected over websocket, response received';
      } else {
        expectEqual('upgraded to', await upgraded, 'websocket');
        expectEqual('transport after upgrade', socket.io.engine.transport.name, 'websocket');
        const reply = await roundTrip(socket, 'hello after upgrade');
        expectEqual('response', reply.received, 'hello after upgrade');
        summary = 'handshake over polling, upgraded to websocket, response received over websocket';
      }

      const payload = crypto.randomBytes(100_000);
      const reply = await roundTrip(socket, payload);
      if (!Buffer.isBuffer(reply.received) || !reply.received.equals(payload)) {
        throw new Error('the 100 KB binary payload came back different');
      }
      return `${summary}, 100 KB binary payload returned intact`;
    } finally {
      socket.close();
    }
  },
);

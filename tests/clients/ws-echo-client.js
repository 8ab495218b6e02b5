'use strict';
// A Node `ws` client against an echo server: text messages (empty, ASCII, non-ASCII, 256 KiB,
// so the large one spans many TCP segments and tunnel frames), optionally binary ones, then a
// clean close whose code the server must echo.
//
// With --idle-pings N it then stays silent until N pings have arrived (the edge's keepalive;
// `ws` answers each with a pong) and checks the connection still echoes.
//
//   node ws-echo-client.js ws://NAME.localhost:PORT/ [--prefix 'Echo: '] [--binary]
//       [--expect-extension permessage-deflate] [--idle-pings N]
const crypto = require('node:crypto');
const { runClient, openWebSocket, closeWebSocket, expectEqual } = require('./lib/client');

const TEXTS = ['hello', '', 'héllo wörld, 你好 🌍', 'x'.repeat(256 * 1024)];

runClient(
  'ws-echo',
  {
    prefix: { type: 'string', default: '' },
    binary: { type: 'boolean', default: false },
    'expect-extension': { type: 'string' },
    'idle-pings': { type: 'string', default: '0' },
  },
  async ({ url, agent, args }) => {
    const { ws, inbox } = await openWebSocket(url, agent);
    let pings = 0;
    let pinged = () => {};
    ws.on('ping', () => {
      pings += 1;
      pinged();
    });
    if (args['expect-extension'] && !ws.extensions.includes(args['expect-extension'])) {
      throw new Error(`extension ${args['expect-extension']} not negotiated (got "${ws.extensions}")`);
    }

    for (const text of TEXTS) {
      ws.send(text);
      const reply = await inbox.next();
      expectEqual('reply kind', reply.isBinary, false);
      expectEqual('reply', reply.data.toString('utf8'), args.prefix + text);
    }

    let binaries = 0;
    if (args.binary) {
      for (const size of [1, 125, 126, 65535, 65536, 300_000]) {
        const payload = crypto.randomBytes(size);
        ws.send(payload);
        const reply = await inbox.next();
        expectEqual('binary reply kind', reply.isBinary, true);
        if (!reply.data.equals(payload)) throw new Error(`binary echo of ${size} bytes differs`);
        binaries += 1;
      }
    }

    const idlePings = Number(args['idle-pings']);
    let idle = '';
    if (idlePings > 0) {
      const from = pings;
      await new Promise((resolve) => {
        pinged = () => pings - from >= idlePings && resolve();
      });
      expectEqual('messages received while idle', inbox.queue.length, 0);
      ws.send('still here');
      const reply = await inbox.next();
      expectEqual('reply after idling', reply.data.toString('utf8'), `${args.prefix}still here`);
      idle = `, idle through ${pings - from} pings and still echoing`;
    }

    const closeCode = await closeWebSocket(ws, 1000, 'done');
    expectEqual('close code from the server', closeCode, 1000);
    const ext = ws.extensions ? `, extensions "${ws.extensions}"` : '';
    return `${TEXTS.length} text + ${binaries} binary messages echoed${idle}, close 1000${ext}`;
  },
);

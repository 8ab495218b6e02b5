'use strict';
// The `ws` README echo server, as people paste it: `new WebSocket.Server({ port })`, replying
// `Echo: ${message}`. Port 0 so the test picks a free one.
const WebSocket = require('ws');
const { announce, exitWithParent } = require('./lib/server');

exitWithParent();
const wss = new WebSocket.Server({ port: 0 });
wss.on('listening', () => announce(wss.address().port));
wss.on('connection', (ws) => {
  ws.on('message', (message) => {
    ws.send(`Echo: ${message}`);
  });
});

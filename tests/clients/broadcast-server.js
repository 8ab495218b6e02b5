'use strict';
// The `ws` README broadcast server: every message goes to every other open client, never back
// to its sender.
const WebSocket = require('ws');
const { announce, exitWithParent } = require('./lib/server');

exitWithParent();
const wss = new WebSocket.Server({ port: 0 });
wss.on('listening', () => announce(wss.address().port));
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    wss.clients.forEach((client) => {
      if (client !== ws && client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    });
  });
});

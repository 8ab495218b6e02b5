'use strict';
// Express and `ws` sharing one port, as people paste it: `http.createServer(app)` serves the
// static page in ./public, `new WebSocket.Server({ server })` answers the page's WebSocket on
// the same host with `Echo: ${message}`. Port 0 so the test picks a free one.
const http = require('node:http');
const path = require('node:path');
const express = require('express');
const WebSocket = require('ws');
const { announce, exitWithParent } = require('./lib/server');

exitWithParent();
const app = express();
app.use(express.static(path.join(__dirname, 'public')));

const server = http.createServer(app);
const wss = new WebSocket.Server({ server });
wss.on('connection', (ws) => {
  ws.on('message', (message) => {
    ws.send(`Echo: ${message}`);
  });
});
server.listen(0, () => announce(server.address().port));

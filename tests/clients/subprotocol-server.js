'use strict';
// A `ws` server that speaks only `superchat`: of the subprotocols a client offers it picks
// `superchat`, refuses clients that do not offer it, and greets each client with the protocol
// it agreed on, so the client can check both ends saw the same answer.
const WebSocket = require('ws');
const { announce, exitWithParent } = require('./lib/server');

exitWithParent();
const wss = new WebSocket.Server({
  port: 0,
  handleProtocols: (protocols) => (protocols.has('superchat') ? 'superchat' : false),
});
wss.on('listening', () => announce(wss.address().port));
wss.on('connection', (ws) => {
  ws.send(`protocol: ${ws.protocol}`);
});

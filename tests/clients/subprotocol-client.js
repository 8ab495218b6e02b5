'use strict';
// Offers the subprotocols `chat` and `superchat`; the server picks `superchat`. Checks the
// visitor sees `superchat` (`ws.protocol`, from Sec-WebSocket-Protocol in the 101) and that
// the server's greeting names the same protocol.
//
//   node subprotocol-client.js ws://NAME.localhost:PORT/
const { runClient, openWebSocket, closeWebSocket, expectEqual } = require('./lib/client');

runClient('subprotocol', {}, async ({ url, agent }) => {
  const { ws, inbox } = await openWebSocket(url, agent, ['chat', 'superchat']);
  expectEqual('negotiated protocol', ws.protocol, 'superchat');
  const greeting = await inbox.next();
  expectEqual('server greeting', greeting.data.toString('utf8'), 'protocol: superchat');
  await closeWebSocket(ws);
  return 'offered chat, superchat; both ends agreed on superchat';
});

'use strict';
// Three clients on the broadcast server. A sends; B and C must receive it. To show A did not
// get its own message without sleeping on a negative, B then sends a second message: the
// server handled A's message before B's (B only sends after receiving A's), so had A's been
// echoed to A it would reach A first. A's first message must therefore be B's.
//
//   node broadcast-client.js ws://NAME.localhost:PORT/
const { runClient, openWebSocket, closeWebSocket, expectEqual } = require('./lib/client');

runClient('broadcast', {}, async ({ url, agent }) => {
  // A client's 'open' means the server already wrote its 101, which ws does only after adding
  // the connection to wss.clients: all three are registered before anyone sends.
  const [a, b, c] = await Promise.all([1, 2, 3].map(() => openWebSocket(url, agent)));

  a.ws.send('from A');
  const [atB, atC] = await Promise.all([b.inbox.next(), c.inbox.next()]);
  expectEqual('B received', atB.data.toString(), 'from A');
  expectEqual('C received', atC.data.toString(), 'from A');

  b.ws.send('from B');
  const [atA, atC2] = await Promise.all([a.inbox.next(), c.inbox.next()]);
  expectEqual('A received first (its own message must not come back)', atA.data.toString(), 'from B');
  expectEqual('C received', atC2.data.toString(), 'from B');

  await Promise.all([a, b, c].map(({ ws }) => closeWebSocket(ws)));
  return '3 clients: A sent, B and C received, A did not get its own message';
});

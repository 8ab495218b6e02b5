'use strict';
// The Socket.io 4 server people paste: `require('socket.io')(port)`, answering each 'message'
// with `socket.emit('response', { received })`. Port 0 so the test picks a free one.
const { announce, exitWithParent } = require('./lib/server');

exitWithParent();
const io = require('socket.io')(0);
io.httpServer.on('listening', () => announce(io.httpServer.address().port));
io.on('connection', (socket) => {
  socket.on('message', (received) => {
    socket.emit('response', { received });
  });
});

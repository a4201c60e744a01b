// A second anchor for bench/fanout.py: bench/baseline_server.py, in Node.js with `ws`.
//
//   node bench/node/server.js PORT        (127.0.0.1 only; `npm ci --prefix bench/node` first)
//
// It does exactly what the Python baseline does: read the first frame (chatlib's `hello`) and
// drop it, then forward every frame received, verbatim and with its opcode (text stays text),
// to every open client, the sender included. No log, no validation, no presence, no queue of
// its own: `ws.send()` writes to the socket at once and lets the stream buffer what the kernel
// does not take. permessage-deflate is off (ws's default for a server; said here so that it
// stays off): the tables it appears in are measured without compression. Like the baseline,
// it prints one "... serving on ws://127.0.0.1:PORT/ws" line when it accepts connections, and
// stops on SIGTERM or SIGINT.
"use strict";

const { WebSocketServer, WebSocket } = require("ws");

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node server.js PORT");
  process.exit(2);
}

const wss = new WebSocketServer({
  host: "127.0.0.1",
  port,
  path: "/ws",
  perMessageDeflate: false,
  maxPayload: 4 * 1024 * 1024,
  clientTracking: true,
});

wss.on("connection", (ws) => {
  let greeted = false;
  ws.on("error", () => {}); // a client gone mid-write: the close event cleans up
  ws.on("message", (data, isBinary) => {
    if (!greeted) {
      greeted = true; // the hello frame: chatlib's protocol starts with it
      return;
    }
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    }
  });
});

wss.on("listening", () => {
  console.log(`node ws ${require("ws/package.json").version} serving on ws://127.0.0.1:${port}/ws`);
});

function stop() {
  for (const client of wss.clients) client.terminate();
  wss.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

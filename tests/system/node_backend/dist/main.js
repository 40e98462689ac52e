// A stand-in for the built aiPBX NestJS backend, with the same contract: HTTP on $PORT
// (routes under /api), WebSocket on 3033 (hard-coded, as in the real source), RTP on UDP
// $UDP_SERVER_PORT answered to the packet's source. Node's standard library only.
"use strict";
const crypto = require("crypto");
const dgram = require("dgram");
const http = require("http");

const VERSION = "node-" + process.version;
const api = http.createServer((req, res) => {
  if (!req.url.startsWith("/api")) { res.writeHead(404); res.end(); return; }
  res.writeHead(200, { "Content-Type": "application/json" });
  res.end(JSON.stringify({ ok: true, version: VERSION, color: process.env.AIPBX_COLOR,
                           db_host: process.env.DB_HOST, jit: true }));
});
api.listen(Number(process.env.PORT));

const ws = http.createServer((req, res) => { res.writeHead(426); res.end(); });
ws.on("upgrade", (req, socket) => {
  const accept = crypto.createHash("sha1")
    .update(req.headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
    .digest("base64");
  socket.write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
               "Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + "\r\n\r\n");
});
ws.listen(3033);

const udp = dgram.createSocket("udp4");
udp.on("message", (msg, rinfo) => {
  udp.send(Buffer.concat([Buffer.from(VERSION + " "), msg]), rinfo.port, rinfo.address);
});
udp.bind(Number(process.env.UDP_SERVER_PORT));
process.on("SIGTERM", () => { api.close(); ws.close(); udp.close(); process.exit(0); });

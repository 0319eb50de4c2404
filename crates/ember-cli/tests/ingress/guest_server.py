# The servers an ingress test runs inside its sandbox (Python's standard
# library only): HTTP on 8000 (a page, a header echo, a download, an upload
# digest, Server-Sent Events, a WebSocket echo) and a raw TCP echo on 7000.
import base64
import hashlib
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/hello":
            return self.reply(200, b"hello from the sandbox\n")
        if self.path.startswith("/headers"):
            seen = {k.lower(): v for k, v in self.headers.items()}
            body = json.dumps({"path": self.path, "headers": seen}).encode()
            return self.reply(200, body, "application/json")
        if self.path == "/big":
            size = os.path.getsize("/tmp/big")
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open("/tmp/big", "rb") as f:
                while True:
                    data = f.read(1 << 16)
                    if not data:
                        break
                    self.wfile.write(data)
            return
        if self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk(b"data: one\n\n")
            # The second event waits for the test: it proves the first one
            # was delivered while the response was still open.
            deadline = time.time() + 120
            while not os.path.exists("/tmp/sse-go") and time.time() < deadline:
                time.sleep(0.05)
            self.chunk(b"data: two\n\n")
            self.chunk(b"")
            return
        if self.path == "/ws":
            return self.websocket()
        self.reply(404, b"no such page\n")

    def do_POST(self):
        digest = hashlib.sha256()
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 16))
                    digest.update(data)
                    left -= len(data)
                    total += len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    break
                digest.update(data)
                left -= len(data)
                total += len(data)
        body = json.dumps({"sha256": digest.hexdigest(), "bytes": total}).encode()
        self.reply(200, body, "application/json")

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            op, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if op == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            reply = b"echo: " + data
            size = bytes([len(reply)]) if len(reply) < 126 else b"\x7e" + struct.pack(">H", len(reply))
            self.wfile.write(bytes([0x80 | op]) + size + reply)
            self.wfile.flush()


def tcp_echo():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 7000))
    listener.listen()

    def serve(conn):
        # Upper-cases what it gets; at the client's end of input it says
        # how much that was, then closes (a half-close must travel).
        total = 0
        while True:
            data = conn.recv(65536)
            if not data:
                break
            total += len(data)
            conn.sendall(data.upper())
        conn.sendall(b"\nbytes: %d\n" % total)
        conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


threading.Thread(target=tcp_echo, daemon=True).start()
ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()

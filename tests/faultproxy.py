"""An HTTP proxy in front of a real S3 server that injects faults, for tests of retries against
real HTTP rather than patched exceptions.

    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add("GET", r"/bucket/data/shard-00001\\.tar", "503", times=2)    # SlowDown, twice
        proxy.add("GET", r"\\.tar$", "reset", times=1)      # headers and half the body, then a TCP reset
        proxy.add("PUT", r"partNumber=2", "reset", times=1)  # an upload's request read, then a reset:
                                                            # the server never sees it
        proxy.add("GET", r"\\.tar$", "stall", seconds=5)    # answers nothing for 5 s, then closes
        proxy.add("PUT", r"/bucket/ckpt/", "403")           # AccessDenied for good (times=None)
        factory = S3ClientFactory(endpoint_url=proxy.endpoint_url, ..., read_timeout=1)
        ...
        proxy.served  # [(method, path, fault)] of every request a rule answered

Rules are tried in the order added; the first whose method and path pattern match and whose
`times` is not used up answers. Everything else is forwarded as it came (the Host header
included, so the request's signature still holds) and answered as the server answered. The
proxy runs in threads of the test's process; DataLoader workers and rank processes reach it
over HTTP like any client.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import re
import socket
import struct
import threading
import time
import urllib.parse

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
    "404-bucket": (404, "NoSuchBucket", "The specified bucket does not exist"),
}
FAULTS = (*_ERRORS, "reset", "stall", "latency")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection"}


@dataclasses.dataclass
class Rule:
    method: str | None
    path: re.Pattern
    fault: str
    times: int | None  # None: for good
    seconds: float = 0.0

    def takes(self, method: str, path: str) -> bool:
        return (self.method in (None, method) and bool(self.path.search(urllib.parse.unquote(path)))
                and (self.times is None or self.times > 0))


class FaultProxy:
    def __init__(self, upstream: str, *, port: int = 0):
        self.port = port
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.rules: list[Rule] = []
        self.served: list[tuple[str, str, str]] = []
        self.forwarded = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def add(self, method: str | None, path: str, fault: str, *, times: int | None = None, seconds: float = 0.0) -> Rule:
        if fault not in FAULTS:
            raise ValueError(f"fault {fault!r}: one of {', '.join(FAULTS)}")
        rule = Rule(method, re.compile(path), fault, times, seconds)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.served.clear()

    def count(self, fault: str) -> int:
        return sum(1 for *_, f in self.served if f == fault)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _take(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.takes(method, path):
                    if rule.times is not None:
                        rule.times -= 1
                    self.served.append((method, path, rule.fault))
                    return rule
            self.forwarded += 1
        return None

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                body = self._body()
                rule = proxy._take(self.command, self.path)
                if rule is not None and rule.fault in _ERRORS:
                    status, code, message = _ERRORS[rule.fault]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                               f"<Message>{message}</Message><Resource>{self.path}</Resource></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if rule is not None and rule.fault == "reset" and self.command in ("PUT", "POST"):
                    # An upload (a PUT, a multipart part) whose connection drops before any answer:
                    # the request is read, never forwarded, and the connection reset.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if rule is not None and rule.fault == "stall":
                    time.sleep(rule.seconds)
                    self.close_connection = True
                    return
                if rule is not None and rule.fault == "latency":
                    time.sleep(rule.seconds)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                                     headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP:
                            self.send_header(name, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                finally:
                    upstream.close()
                if rule is not None and rule.fault == "reset" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    # SO_LINGER 0: close sends a TCP reset, as a dropped connection does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

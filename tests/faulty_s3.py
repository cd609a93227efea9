"""A fault-injecting HTTP proxy in front of the test S3 server.

Every `every`-th request meets a fault instead of being forwarded, cycling
through `faults`: "503" (SlowDown), "500" (InternalError), "reset" (the
connection is closed without a response) and "slow" (forwarded after a
delay), so clients see the transient failures real object stores produce
under load. Nothing is
mocked: the client is s3fs/botocore, the server behind is moto's.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
          "500": (500, "InternalError", "We encountered an internal error. Please try again.")}


class FaultyS3Proxy:
    def __init__(self, upstream: str, every: int, faults=("503", "500"), delay: float = 0.5):
        host, port = upstream.removeprefix("http://").split(":")
        counter, lock = itertools.count(1), threading.Lock()
        self.injected = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    n = next(counter)
                if n % every == 0:
                    with lock:
                        proxy.injected += 1
                    fault = faults[(n // every) % len(faults)]
                    if fault == "reset":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if fault == "slow":
                        time.sleep(delay)
                    else:
                        status, code, message = ERRORS[fault]
                        payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                                   f"<Message>{message}</Message></Error>").encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

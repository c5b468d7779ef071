"""A real HTTP server on loopback for ingestion and alert tests: routes map paths to behaviours, hits
are counted, and POSTed bodies (webhook calls) are kept."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    def __init__(self):
        # path -> (status, content_type, body), ("slow", seconds), ("redirect", to) or ("drip", body, seconds)
        self.routes: dict[str, tuple] = {}
        self.hits: Counter = Counter()
        self.posted: list[tuple[str, bytes]] = []  # (path, body) of each POST, in order
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                server.posted.append((self.path, self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(204)
                self.end_headers()

            def do_GET(self):
                server.hits[self.path] += 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                elif route[0] == "slow":
                    time.sleep(route[1])  # never answers within the client's read timeout
                elif route[0] == "drip":  # ("drip", body, seconds between chunks of 16 bytes)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(route[1])))
                    self.end_headers()
                    for start in range(0, len(route[1]), 16):
                        self.wfile.write(route[1][start:start + 16])
                        self.wfile.flush()
                        time.sleep(route[2])
                elif route[0] == "redirect":
                    self.send_response(302)
                    self.send_header("Location", route[1])
                    self.end_headers()
                else:
                    status, kind, body = route
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

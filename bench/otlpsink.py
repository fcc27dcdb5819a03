"""An OTLP/HTTP trace receiver that takes everything and keeps nothing, for `make bench`'s
tracing rows: the gateway exports every span to it, so the run measures what tracing costs
the gateway (building spans at the request's end, the exporter's thread), not a collector.

`GET /count` answers how many export requests and bytes it has taken, so the run can check
that spans did arrive.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    exports = 0
    received_bytes = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        with _Sink.lock:
            _Sink.exports += 1
            _Sink.received_bytes += length
        self._answer(b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path == "/count":
            body = {"exports": _Sink.exports, "bytes": _Sink.received_bytes}
            self._answer(json.dumps(body).encode(), "application/json")
        else:
            self._answer(b"ok", "text/plain")

    def _answer(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlpsink")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), _Sink).serve_forever()


if __name__ == "__main__":
    main()

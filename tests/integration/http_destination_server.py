"""A real HTTP destination on 127.0.0.1 for delivery tests.

It accepts each Idempotency-Key once (201) and responds 409 to a key it
already accepted, as a destination that honours the header would. Tests can
make it respond with a given status for the next requests or for every request,
and stop and restart it on the same port so that connections are refused
in between.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        key = self.headers.get("Idempotency-Key") or ""
        status, answer = self.server.owner.answer(key, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args) -> None:
        pass  # keep test output quiet


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, owner: TestDestination) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.owner = owner


class TestDestination:
    """Records every request; see the module docstring for its responses."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: list[str] = []
        self.bodies: dict[str, bytes] = {}
        self.accepted: Counter[str] = Counter()
        self._forced: list[tuple[int, str]] = []
        self._always: tuple[int, str] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The URL deliveries are posted to."""
        return f"http://127.0.0.1:{self.port}/journals"

    def start(self) -> TestDestination:
        """Listen (on a free port the first time, the same port after)."""
        self._server = _Server(self.port, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def fail_next(self, count: int, status: int, text: str = "failure") -> None:
        """Respond ``status`` to the next ``count`` requests."""
        with self._lock:
            self._forced.extend([(status, text)] * count)

    def always(self, status: int | None, text: str = "failure") -> None:
        """Answer ``status`` to every request until called with None."""
        with self._lock:
            self._always = None if status is None else (status, text)

    def answer(self, key: str, body: bytes) -> tuple[int, dict]:
        """Record the request and return the status and JSON body to send."""
        with self._lock:
            self.received.append(key)
            forced = self._forced.pop(0) if self._forced else self._always
            if forced is not None:
                return forced[0], {"error": forced[1]}
            if self.accepted[key]:
                return 409, {"error": "duplicate idempotency key"}
            self.accepted[key] += 1
            self.bodies[key] = body
            return 201, {"id": f"remote-{len(self.bodies)}"}

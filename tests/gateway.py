"""A real HTTP server standing in for an API gateway that takes accessflow's webhooks.

It listens on 127.0.0.1 on a free port, in a thread, keeps every request it receives (headers
and body bytes, exactly as they came), and answers each with the next of the statuses it was
told, then 200. It verifies nothing itself: the tests do, with the ``standardwebhooks``
package, an implementation of the spec independent of accessflow's.
"""

from __future__ import annotations

import base64
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

#: The longest a request body may be; accessflow's are a few hundred bytes.
MAX_BODY = 64 * 1024


def new_secret() -> str:
    """A fresh Standard Webhooks secret: whsec_ and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def verified(self, secret: str) -> Any:
        """The JSON body, once ``secret`` verifies its signature; raises WebhookVerificationError otherwise."""
        return Webhook(secret).verify(self.body, self.headers)


class GatewayServer:
    """An HTTP server that records each POST and answers with the scripted statuses, then 200."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._answers: list[tuple[int, bytes, dict[str, str]]] = []
        self._lock = threading.Lock()
        #: While cleared, every request waits for it (at most 30 s) before it is answered: a slow gateway.
        self.answering = threading.Event()
        self.answering.set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("content-length") or 0), MAX_BODY)
                body = self.rfile.read(length)
                with server._lock:
                    server.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status, text, headers = server._answers.pop(0) if server._answers else (200, b"", {})
                server.answering.wait(30)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test reads ``received``; stderr stays quiet

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="gateway-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/accessflow/credentials"

    def answer(self, status: int, text: bytes = b"", *, times: int = 1, **headers: str) -> None:
        """Answer the next ``times`` requests with ``status`` and ``text``."""
        with self._lock:
            self._answers.extend([(status, text, headers)] * times)

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def about(self, credential_id: str) -> list[Received]:
        """The requests whose body names ``credential_id``, in arrival order."""
        return [r for r in self.requests() if f'"credential_id":"{credential_id}"'.encode() in r.body]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.answering.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@contextmanager
def gateway_server() -> Iterator[GatewayServer]:
    server = GatewayServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()

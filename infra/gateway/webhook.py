"""The gateway port as a signed webhook, following the Standard Webhooks spec (standardwebhooks.com).

Each credential change is one ``POST`` of a JSON body to ``ACCESSFLOW_GATEWAY_WEBHOOK_URL``::

    webhook-id: <the change's event id: the same on every retry of one push>
    webhook-timestamp: <unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256 over "<id>.<timestamp>.<body>"> [v1,<...> ...]

    {"type": "credential.issued", "timestamp": "...", "data": {"credential_id": ..., "secret_hash": ...}}

The key is the base64 part of a ``whsec_`` secret. During a rotation the setting holds
several secrets, and every request carries one signature by each, space-separated, so the
gateway may verify with either. The body holds the secret's hash (which lets the gateway
check a presented key itself), never the secret: accessflow has no readable copy of it.

What an answer means: 2xx, taken; 408, 429, 5xx, a timeout or a connection that failed,
:class:`~domain.errors.TransientError` (retried with backoff); any other answer, a 3xx
included, :class:`~domain.errors.PermanentDeliveryError` (dead-lettered at once, with the
reason). Redirects are never followed: a signed push goes to the configured host only, and
a moved endpoint is a configuration to fix, not something to follow.

Only the standard library: one connection per push (changes are rare next to requests),
with one deadline over connect, send and the answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from urllib.parse import urlsplit

from domain.errors import PermanentDeliveryError, TransientError
from domain.ports import CredentialChange
from infra.messaging.envelope import safe_text
from infra.settings import Settings, webhook_key

#: Answers that a later attempt may not get: a timeout, too many requests, the server's fault.
RETRIED_STATUSES = frozenset({408, 429})
#: Bytes of an answer's body read for the reason of a refusal; the rest is not read.
REASON_BYTES = 300
USER_AGENT = "accessflow-gateway-webhook/1"


def body_of(change: CredentialChange) -> bytes:
    """The webhook's JSON body: Standard Webhooks' ``type``, ``timestamp`` and ``data``, compact and sorted."""

    def instant(value: datetime | None) -> str | None:
        return value.isoformat().replace("+00:00", "Z") if value is not None else None

    payload = {
        "type": f"credential.{change.change}",
        "timestamp": instant(change.occurred_at),
        "data": {
            "event_id": change.event_id,
            "change": change.change,
            "revision": change.revision,
            "credential_id": change.credential_id,
            "public_id": change.public_id,
            "app_id": change.app_id,
            "consumer_id": change.consumer_id,
            "kind": change.kind,
            "status": change.status,
            "product_ids": list(change.product_ids),
            "rate_limit_per_minute": change.rate_limit_per_minute,
            "monthly_quota": change.monthly_quota,
            "secret_hash": change.secret_hash,
            "expires_at": instant(change.expires_at),
            "plan_id": change.plan_id,
            "previous_public_id": change.previous_public_id,
            "previous_secret_hash": change.previous_secret_hash,
            "previous_valid_until": instant(change.previous_valid_until),
        },
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64>`` by each key, space-separated."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys
    )


class StandardWebhookGateway:
    """Pushes credential changes to one URL as signed Standard Webhooks requests.

    Parameters:
      url: the endpoint, http:// or https:// (the settings refuse anything else).
      secrets: ``whsec_`` secrets; each request is signed with every one (rotation).
      timeout: seconds one push may take in all, connect, send and answer together.
      clock: unix time in seconds, for the ``webhook-timestamp``; the tests set it.
    """

    def __init__(
        self,
        url: str,
        secrets: Sequence[str],
        timeout: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the gateway webhook URL must be http:// or https:// with a host")
        if not secrets:
            raise ValueError("the gateway webhook needs at least one signing secret")
        self.url = url
        #: The URL as errors and logs show it: without its query, which may hold a token.
        self.shown_url = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._keys = [webhook_key(secret) for secret in secrets]
        self.timeout = timeout
        self._clock = clock
        self._tls = ssl.create_default_context() if self._https else None

    @classmethod
    def from_settings(cls, settings: Settings) -> StandardWebhookGateway | None:
        """The gateway the settings configure, or ``None`` when ``ACCESSFLOW_GATEWAY_WEBHOOK_URL`` is unset."""
        if settings.gateway_webhook_url is None:
            return None
        return cls(
            settings.gateway_webhook_url,
            settings.gateway_webhook_secrets(),
            settings.gateway_webhook_timeout_seconds,
        )

    def __repr__(self) -> str:  # never the keys
        return f"StandardWebhookGateway({self.shown_url!r}, {len(self._keys)} secret(s), timeout={self.timeout:g})"

    def push(self, change: CredentialChange) -> None:
        """Post ``change``; return once the gateway answered 2xx.

        Raises:
          TransientError: no answer in time, no connection, or 408, 429, 5xx.
          PermanentDeliveryError: any other answer: the gateway refuses it for good.
        """
        body = body_of(change)
        timestamp = int(self._clock())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": change.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._keys, change.event_id, timestamp, body),
        }
        deadline = time.monotonic() + self.timeout
        connection = (
            http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._tls)
            if self._https
            else http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        )
        try:
            connection.request("POST", self._path, body=body, headers=headers)
            self._within(connection, deadline)
            response = connection.getresponse()
            self._within(connection, deadline)
            status, reason = response.status, response.reason
            excerpt = response.read(REASON_BYTES)
        except (OSError, http.client.HTTPException) as error:  # socket.timeout and ssl errors are OSError
            raise TransientError(
                f"gateway webhook {self.shown_url}: no answer ({_describe(error)})"
            ) from None
        finally:
            connection.close()
        if 200 <= status < 300:
            return
        said = _said(status, reason, excerpt)
        if status >= 500 or status in RETRIED_STATUSES:
            raise TransientError(f"gateway webhook {self.shown_url} answered {said}")
        if 300 <= status < 400:
            raise PermanentDeliveryError(
                f"gateway webhook {self.shown_url} answered {said}: redirects are not followed, "
                "set ACCESSFLOW_GATEWAY_WEBHOOK_URL to the endpoint itself"
            )
        raise PermanentDeliveryError(f"gateway webhook {self.shown_url} refused the change: {said}")

    def _within(self, connection: http.client.HTTPConnection, deadline: float) -> None:
        """Shorten the socket's timeout to what is left of the push's deadline; a spent one times out."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the push's {self.timeout:g} s deadline passed")
        if connection.sock is not None:
            connection.sock.settimeout(remaining)


def _said(status: int, reason: str, excerpt: bytes) -> str:
    text = " ".join(excerpt.decode("utf-8", errors="replace").split())
    said = f"{status} {safe_text(reason)[:100]}".strip()
    return f"{said} ({safe_text(text)[:200]})" if text else said


def _describe(error: BaseException) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return "timed out"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {safe_text(text)[:200]}" if text else type(error).__name__

"""The dashboard's safety layer: the access token gate, CSRF tokens, Host checks and the
response headers every page gets.

The gate is plain ASGI middleware around the whole app, so no route can forget it: when a
token is set, every request but ``GET /healthz`` needs it, as ``?token=T`` (answered with a
cookie and a redirect to the same URL without it), the cookie, or ``Authorization: Bearer
T``. CSRF tokens are stateless: a timestamp signed with a secret the app draws at start, so
a page from this app is needed to make one, and a cross-site form cannot.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import urllib.parse
from collections.abc import Iterable
from typing import Final, final

from starlette.datastructures import Headers, QueryParams
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["TOKEN_COOKIE", "CsrfSigner", "SafetyMiddleware", "loopback_hosts"]

TOKEN_COOKIE: Final = "trioqueue_dashboard_token"
CSRF_MAX_AGE: Final = 24 * 3600
"""A page's CSRF token is good for a day: reload the page after that."""

_SECURITY_HEADERS: Final = [
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

_UNAUTHORIZED_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trioqueue dashboard: token needed</title>
</head><body><h1>Access token needed</h1>
<p>This trioqueue dashboard asks for an access token. Open the address that
<code>trioqueue dashboard</code> printed (it ends in <code>?token=&hellip;</code>), or send
<code>Authorization: Bearer TOKEN</code>.</p></body></html>
"""


def loopback_hosts(host: str) -> list[str] | None:
    """The Host header values to accept when serving on ``host``: for a loopback address,
    only loopback names (so a DNS-rebound name cannot reach the app); else any (None)."""
    if host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        return ["127.0.0.1", "localhost", "[::1]"]
    return None


@final
class CsrfSigner:
    """Makes and checks CSRF tokens: ``ISSUED.SIGNATURE``, valid for ``CSRF_MAX_AGE``."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _sign(self, issued: str) -> str:
        digest = hmac.new(self._key, b"csrf:" + issued.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def make(self) -> str:
        issued = str(int(time.time()))
        return f"{issued}.{self._sign(issued)}"

    def check(self, token: str | None) -> bool:
        """Whether ``token`` is one this signer made less than a day ago."""
        if not token or token.count(".") != 1:
            return False
        issued, signature = token.split(".")
        if not issued.isdigit() or not hmac.compare_digest(signature, self._sign(issued)):
            return False
        age = time.time() - int(issued)
        return -60 <= age <= CSRF_MAX_AGE


@final
class SafetyMiddleware:
    """Checks the Host header and the access token on every HTTP request, and adds the
    security headers to every response."""

    def __init__(
        self, app: ASGIApp, *, token: str | None, allowed_hosts: Iterable[str] | None
    ) -> None:
        self._app = app
        self._token = token
        self._hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self._app(scope, receive, send_with_headers)

    def _host_allowed(self, headers: Headers) -> bool:
        if self._hosts is None:
            return True
        host = headers.get("host", "").lower()
        if host.startswith("["):
            name = host.partition("]")[0] + "]"
        else:
            name = host.partition(":")[0]
        return name in self._hosts

    def _refusal(self, scope: Scope) -> Response | None:
        """The response that refuses this request, or None to let it through."""
        headers = Headers(scope=scope)
        if not self._host_allowed(headers):
            return PlainTextResponse("bad Host header for this dashboard\n", status_code=400)
        if self._token is None or scope["path"] == "/healthz":
            return None
        query_params = QueryParams(scope["query_string"])
        given = query_params.get("token")
        if given is not None:
            if not hmac.compare_digest(given.encode(), self._token.encode()):
                return self._unauthorized()
            if scope["method"] not in ("GET", "HEAD"):
                return None
            # Move the token out of the address (and the browser history) into a cookie.
            query = urllib.parse.urlencode(
                [(k, v) for k, v in query_params.multi_items() if k != "token"]
            )
            target = scope["path"] + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                TOKEN_COOKIE, self._token, httponly=True, samesite="strict", path="/"
            )
            return response
        cookie = _cookie(headers, TOKEN_COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), self._token.encode()):
            return None
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self._token.encode()
        ):
            return None
        return self._unauthorized()

    @staticmethod
    def _unauthorized() -> Response:
        return HTMLResponse(
            _UNAUTHORIZED_PAGE, status_code=401, headers={"www-authenticate": "Bearer"}
        )


def _cookie(headers: Headers, name: str) -> str | None:
    for header in headers.getlist("cookie"):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value
    return None

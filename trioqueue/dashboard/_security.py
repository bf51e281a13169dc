"""The dashboard's safety layer: the access token gate, signed stamps (CSRF tokens and flash
messages), same-site redirects, Host checks and the response headers every page gets.

The gate is plain ASGI middleware around the whole app, so no route can forget it: when a
token is set, every request but ``GET /healthz`` needs it, as ``?token=T`` (answered with a
cookie and a redirect to the same URL without it), the cookie, or ``Authorization: Bearer
T``. The cookie never holds the token itself, only a MAC derived from it (``cookie_value``),
so a token of any characters fits in it. CSRF tokens and flash messages are stateless: a
timestamp signed with a secret the app draws at start, so a page from this app is needed to
make one, and a cross-site form or a link cannot.
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
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CSRF_MAX_AGE",
    "FLASH_MAX_AGE",
    "TOKEN_COOKIE",
    "SafetyMiddleware",
    "Signer",
    "cookie_value",
    "loopback_hosts",
    "redirect",
]

TOKEN_COOKIE: Final = "trioqueue_dashboard_token"
CSRF_MAX_AGE: Final = 24 * 3600
"""A page's CSRF token is good for a day: reload the page after that."""
FLASH_MAX_AGE: Final = 10 * 60
"""A flash message shows on the page an action redirected to, for ten minutes at most."""
_COOKIE_LABEL: Final = b"trioqueue dashboard cookie v1"

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


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _utf8(text: str) -> bytes:
    """``text`` as bytes, whatever it holds (a token from argv may carry lone surrogates)."""
    return text.encode("utf-8", "surrogatepass")


def cookie_value(token: str) -> str:
    """What the access cookie holds for ``token``: HMAC-SHA256 of a fixed label keyed by the
    token, in URL-safe base64 (43 characters that need no quoting in a cookie).

    Not the token: a cookie read off a disk or a log cannot be used as a Bearer token or a
    ``?token=`` link. It depends on the token alone, so it survives a restart and holds for
    every process serving the same token; changing the token invalidates it.
    """
    return _cookie_mac(_utf8(token))


def _cookie_mac(token: bytes) -> str:
    return _b64(hmac.new(token, _COOKIE_LABEL, hashlib.sha256).digest())


@final
class Signer:
    """Makes and checks stamps ``ISSUED.SIGNATURE``: a Unix time and an HMAC-SHA256, under a
    key drawn at start, of that time, a purpose (``"csrf"``, ``"flash"``) and a message."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _sign(self, purpose: str, message: str, issued: str) -> str:
        signed = b"\0".join([_utf8(purpose), _utf8(issued), _utf8(message)])
        return _b64(hmac.new(self._key, signed, hashlib.sha256).digest())

    def make(self, purpose: str, message: str = "") -> str:
        issued = str(int(time.time()))
        return f"{issued}.{self._sign(purpose, message, issued)}"

    def check(self, stamp: str | None, purpose: str, message: str = "", *, max_age: int) -> bool:
        """Whether ``stamp`` is one this signer made for ``purpose`` and ``message`` less than
        ``max_age`` seconds ago. Compared in constant time."""
        if not stamp or stamp.count(".") != 1:
            return False
        issued, signature = stamp.split(".")
        if not (issued.isascii() and issued.isdigit()) or len(issued) > 12:
            return False
        expected = self._sign(purpose, message, issued)
        if not hmac.compare_digest(_utf8(signature), _utf8(expected)):
            return False
        age = time.time() - int(issued)
        return -60 <= age <= max_age


def same_site(path: str, query: str = "") -> str:
    """A ``Location`` that stays on this site: ``path`` with its leading slashes and
    backslashes collapsed into one ``/`` and every character a browser could read as
    something else (``\\``, ``%``, ``?``, ``#``, controls, spaces, non-ASCII) percent-encoded,
    then ``?query`` if given (kept as encoded, anything else but printable ASCII encoded).

    So the result is printable ASCII starting with exactly one ``/`` followed by neither
    ``/`` nor ``\\``: no scheme, no host, whatever ``path`` was (``//evil.example/``,
    ``/\\evil.example``, a decoded ``%2F%2F``...).
    """
    location = "/" + urllib.parse.quote(path.lstrip("/\\"), safe="/:@!$&'()*+,;=")
    if query:
        location += "?" + urllib.parse.quote(query, safe="/:@!$&'()*+,;=?%")
    return location


def redirect(path: str, query: str = "", status_code: int = 303) -> Response:
    """A redirect (303 by default) to ``same_site(path, query)``: every redirect the
    dashboard sends is made here."""
    return Response(status_code=status_code, headers={"location": same_site(path, query)})


@final
class SafetyMiddleware:
    """Checks the Host header and the access token on every HTTP request, and adds the
    security headers to every response."""

    def __init__(
        self, app: ASGIApp, *, token: str | None, allowed_hosts: Iterable[str] | None
    ) -> None:
        self._app = app
        # What the cookie holds; a token given is checked by comparing its cookie value
        # with this one, so the comparison takes the same time whatever the lengths.
        self._cookie = None if token is None else cookie_value(token)
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
        expected = self._cookie
        if expected is None or scope["path"] == "/healthz":
            return None
        query_params = QueryParams(scope["query_string"])
        given = query_params.get("token")
        if given is not None:
            if not hmac.compare_digest(_cookie_mac(_utf8(given)), expected):
                return self._unauthorized()
            if scope["method"] not in ("GET", "HEAD"):
                return None
            # Move the token out of the address (and the browser history) into a cookie.
            query = urllib.parse.urlencode(
                [(k, v) for k, v in query_params.multi_items() if k != "token"]
            )
            response = redirect(scope["path"], query)
            response.set_cookie(
                TOKEN_COOKIE,
                expected,
                httponly=True,
                samesite="strict",
                secure=scope.get("scheme") == "https",
                path="/",
            )
            return response
        cookie = _cookie(headers, TOKEN_COOKIE)
        if cookie is not None and hmac.compare_digest(_utf8(cookie), _utf8(expected)):
            return None
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        # Header values arrive decoded as latin-1: encoding them back gives the bytes sent,
        # which are the token's UTF-8 bytes.
        given_bytes = credentials.strip().encode("latin-1")
        if scheme.lower() == "bearer" and hmac.compare_digest(_cookie_mac(given_bytes), expected):
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

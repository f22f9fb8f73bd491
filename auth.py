"""x-api-key authentication as a pure ASGI middleware (the shape of Starlette's own middlewares).

Only the protected paths need a key; /health, /ready and /docs stay open for probes and readers.
Under the OpenAI prefix (/v1/) the same keys are also taken as `Authorization: Bearer <key>`, which
is what every OpenAI client sends; one credential exactly, in either header.
Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key
without stopping early, so neither a key's content nor its length leaks through timing.
Several keys may be configured at once, which lets a key be rotated without downtime.
The presented key is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Collection, Iterable, Mapping

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = b"x-api-key"
BEARER = b"bearer "  # the scheme of an Authorization header, compared without case
Refusal = Callable[[str, int, str, Mapping[str, str]], Response]  # (path, status, detail, headers) -> the answer


def _plain_refusal(path: str, status: int, detail: str, headers: Mapping[str, str]) -> Response:
    # The server passes its own error renderer (server.error_response), so its errors keep one
    # shape; this default is for the middleware used on its own.
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers))


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the root path a proxy or mount may have set."""
    path, root = scope["path"], scope.get("root_path", "")
    return str(path[len(root) :] if root and path.startswith(root) else path)


class APIKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: Iterable[str],
        protected: Collection[str] = ("/generate",),
        refuse: Refusal = _plain_refusal,
        bearer_prefix: str = "",  # paths under it need a key too, given either way
    ):
        self.app, self.refuse, self.bearer_prefix = app, refuse, bearer_prefix
        self.digests = [_digest(k.encode()) for k in keys]
        self.protected = protected
        if not self.digests:
            raise ValueError("at least one API key is required")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope) if scope["type"] == "http" else ""
        bearer = bool(self.bearer_prefix) and path.startswith(self.bearer_prefix)
        if scope["type"] != "http" or (path not in self.protected and not bearer):
            await self.app(scope, receive, send)
            return
        problem = self.check(scope["headers"], bearer)
        if problem is None:
            await self.app(scope, receive, send)
            return
        # The body was never read, so the connection cannot carry another request: close it.
        await self.refuse(path, 401, problem, {"Connection": "close"})(scope, receive, send)

    def check(self, headers: Iterable[tuple[bytes, bytes]], bearer: bool = False) -> str | None:
        """Return None for exactly one valid key, else the reason for a 401. With `bearer`, a key
        in `Authorization: Bearer ...` counts as one too."""
        headers = list(headers)
        presented = [value for name, value in headers if name == HEADER]
        if bearer:
            auth = [value for name, value in headers if name == b"authorization"]
            presented += [value[len(BEARER) :].strip() for value in auth if value[: len(BEARER)].lower() == BEARER]
        named = "x-api-key or Authorization: Bearer" if bearer else "x-api-key"
        if not presented:
            return f"missing {named} header"
        if len(presented) > 1:
            return f"send exactly one key ({named})" if bearer else "send exactly one x-api-key header"
        digest = _digest(presented[0])
        matches = [hmac.compare_digest(digest, known) for known in self.digests]  # no early exit
        return None if any(matches) else "invalid API key"

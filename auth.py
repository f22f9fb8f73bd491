"""x-api-key authentication as a pure ASGI middleware (the shape of Starlette's own middlewares).

Only the protected paths need a key; /health, /ready and /docs stay open for probes and readers.
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
Refusal = Callable[[int, str, Mapping[str, str]], Response]  # (status, detail, headers) -> the answer


def _plain_refusal(status: int, detail: str, headers: Mapping[str, str]) -> Response:
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
    ):
        self.app, self.refuse = app, refuse
        self.digests = [_digest(k.encode()) for k in keys]
        self.protected = protected
        if not self.digests:
            raise ValueError("at least one API key is required")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) not in self.protected:
            await self.app(scope, receive, send)
            return
        problem = self.check(scope["headers"])
        if problem is None:
            await self.app(scope, receive, send)
            return
        # The body was never read, so the connection cannot carry another request: close it.
        await self.refuse(401, problem, {"Connection": "close"})(scope, receive, send)

    def check(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Return None for exactly one valid key, else the reason for a 401."""
        presented = [value for name, value in headers if name == HEADER]
        if not presented:
            return "missing x-api-key header"
        if len(presented) > 1:
            return "send exactly one x-api-key header"
        digest = _digest(presented[0])
        matches = [hmac.compare_digest(digest, known) for known in self.digests]  # no early exit
        return None if any(matches) else "invalid API key"

"""``--api-key``: every endpoint but ``/health`` needs ``Authorization: Bearer <key>``.

A pure ASGI middleware (see ``asgi_limits``: ``@app.middleware("http")`` would hide client
disconnects from the endpoints).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI

OPEN_PATHS = frozenset({"/health"})
_BODY = json.dumps({"error": {"message": "invalid or missing API key", "type": "auth_error",
                              "param": None, "code": 401}, "object": "error"}).encode()


class ApiKeyMiddleware:
    """Refuse requests without the key with 401 (OpenAI's error shape); constant-time compare."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        got = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                got = value
                break
        if hmac.compare_digest(got, self.expected):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(_BODY)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": _BODY})


def install_api_key(app: FastAPI, api_key: str) -> None:
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)

"""``--api-key``: every endpoint but ``/health`` needs ``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

OPEN_PATHS = frozenset({"/health"})


def install_api_key(app: FastAPI, api_key: str) -> None:
    """Refuse requests without the key with 401 (OpenAI's error shape); compare in constant time."""
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def _check_key(request: Request,
                         call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return JSONResponse(
                {"error": {"message": "invalid or missing API key", "type": "auth_error",
                           "param": None, "code": 401}, "object": "error"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

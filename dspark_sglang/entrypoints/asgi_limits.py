"""Pure ASGI middleware for request bodies: refuse bodies above a size limit with 413.

Pure ASGI (not ``@app.middleware("http")``) so that ``Request.is_disconnected()`` keeps seeing
the client's ``http.disconnect`` and a non-streaming request is aborted when its client leaves.
"""

from __future__ import annotations

import json
from typing import Any

from dspark_sglang.entrypoints.protocol import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes "
                              f"(--max-request-body-bytes)", param="body")


class BodySizeLimit:
    """413 for a ``Content-Length`` above ``max_bytes`` before reading anything; a body sent
    without a length (chunked) is counted as it arrives and cut off at the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_error(send, BodyTooLarge(self.max_bytes))
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # the app's ApiError handler answers
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send: Any, err: ApiError) -> None:
    body = json.dumps(err.openai_body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

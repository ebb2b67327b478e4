"""Server-sent events, written the same way by every streaming endpoint (native ``/generate``,
OpenAI ``/v1/completions`` and ``/v1/chat/completions``).

Each event is one ``data: <json>`` line followed by a blank line; the JSON keeps non-ASCII text
as UTF-8 (``ensure_ascii=False``), as SGLang sends it. A stream ends with ``SSE_DONE``.
"""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    """``obj`` (JSON-serialisable) as one SSE event, UTF-8 encoded."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"

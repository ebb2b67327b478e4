"""JSON Lines reading that splits on ``\\n`` only.

``str.splitlines()`` also splits on U+2028, U+2029, U+0085 and other separators that may occur
*inside* a JSON string of a real chat prompt, which breaks a line in two. JSON Lines records are
separated by ``\\n`` (optionally ``\\r\\n``) and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line_index, record)`` for every non-blank line; indices count ``\\n``-lines from 0.
    A malformed line raises ``ValueError`` naming ``path:line``."""
    with Path(path).open(encoding="utf-8", newline="") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from e
            yield i, row


def read_jsonl(path: str | Path) -> list[Any]:
    """All records of a JSON Lines file."""
    return [row for _, row in iter_jsonl(path)]

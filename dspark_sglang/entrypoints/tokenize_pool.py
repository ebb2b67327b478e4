"""Tokenize large texts in a helper process.

HF ``tokenizers`` holds the GIL for a whole ``encode`` call (a 2 MB text: ~5 s on this CPU), so
even from a worker thread it would stall the HTTP event loop. Texts of at least ``min_chars``
characters are encoded in one spawned child process that holds only the ``tokenizers`` library
and a copy of the tokenizer; the calling thread waits on a future with the GIL released.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
from typing import Any

# the child's tokenizer (set once by the pool initializer; this module's only state, and only
# in the child process)
_CHILD_TOKENIZER: Any = None


def _child_init(tokenizer_json: str) -> None:
    global _CHILD_TOKENIZER
    import tokenizers

    _CHILD_TOKENIZER = tokenizers.Tokenizer.from_str(tokenizer_json)


def _child_encode(text: str, add_special_tokens: bool) -> list[int]:
    return list(_CHILD_TOKENIZER.encode(text, add_special_tokens=add_special_tokens).ids)


class TokenizePool:
    """``encode(text)`` equal to ``tokenizer.encode(text)``; big texts go to the child process
    (started on first use). ``shutdown`` ends it."""

    def __init__(self, tokenizer: Any, min_chars: int = 32768) -> None:
        self.tokenizer = tokenizer
        self.min_chars = min_chars
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        if len(text) < self.min_chars:
            return self.tokenizer.encode(text)
        ids = self._get_pool().submit(_child_encode, text, True).result()
        if getattr(self.tokenizer, "_prepend_bos", False):  # what Tokenizer.encode adds itself
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_child_init, initargs=(self.tokenizer.hf.to_str(),))
            return self._pool

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

"""CPU tensors on 2 MiB pages: read-mostly buffers that every decode step streams (the repacked
GGUF weights) placed in anonymous mappings advised ``MADV_HUGEPAGE``.

With 4 KiB pages a decode step that streams ~96 MB of weights crosses ~24,000 pages: a TLB
miss at each and the hardware prefetchers stopping at every page boundary. On the Xeon of
session 21 (transparent huge pages in ``madvise`` mode, so never used for torch's own
allocations) the embedded model's one-token forward ran 4-9 % faster with its weights on 2 MiB
pages (docs/benchmarks.md, session 21).

:func:`to_hugepages` copies a tensor into a chunk of such a mapping (64 MiB chunks, 64-byte
aligned sub-ranges; larger tensors get a mapping of their own) and returns the copy, same bytes,
same shape. A chunk's mapping is unmapped when the last tensor in it is freed (each tensor holds
a reference to the ``mmap`` object); the arena keeps only the chunk being filled.
``DSPARK_HUGEPAGES=0``, a kernel without transparent huge pages (``never``) or a platform
without ``MADV_HUGEPAGE`` leave tensors where they are.

The KV pools stay on torch's pages: with every pool buffer on 2 MiB pages, decode at batch 64
over 512-token contexts ran 6 % slower in one sitting (491 against 518-530 tokens/s) and 3 %
faster in the next (539-541 against 523-524): no consistent gain.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
CHUNK_BYTES = 64 << 20
ALIGN = 64
# tensors smaller than this stay where they are (a few pages: nothing to gain)
MIN_BYTES = 64 << 10

_lock = threading.Lock()
_chunk: tuple[torch.Tensor, int] | None = None  # (uint8 view of the chunk, next free offset)


def hugepages_available() -> bool:
    """Whether :func:`to_hugepages` moves tensors here: Linux ``MADV_HUGEPAGE``, transparent
    huge pages not ``never``, and ``DSPARK_HUGEPAGES`` not ``0``."""
    if os.environ.get("DSPARK_HUGEPAGES", "1").lower() in ("0", "off", "false", "no"):
        return False
    return _kernel_offers_hugepages()


@functools.cache
def _kernel_offers_hugepages() -> bool:
    # read once per process (every repacked weight asks)
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def _map(nbytes: int) -> torch.Tensor:
    """A fresh anonymous mapping of at least ``nbytes`` from a 2 MiB boundary, advised for huge
    pages before any page is touched: a uint8 view starting at the boundary."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to mm
    start = (-buf.data_ptr()) % HUGE_PAGE
    return buf[start:start + size]


def _alloc(nbytes: int) -> torch.Tensor:
    global _chunk
    if nbytes > CHUNK_BYTES // 2:
        return _map(nbytes)[:nbytes]
    with _lock:
        if _chunk is None or _chunk[1] + nbytes > _chunk[0].numel():
            _chunk = (_map(CHUNK_BYTES), 0)
        buf, off = _chunk
        _chunk = (buf, off + -(-nbytes // ALIGN) * ALIGN)
    return buf[off:off + nbytes]


def to_hugepages(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a CPU tensor) copied onto huge pages: same dtype, shape and values; its whole
    storage is copied and the view kept (a tensor that is a view of padded storage, as
    ``gguf_repack_q8``'s, keeps its padding). ``t`` itself when huge pages are unavailable, the
    tensor is small (< 64 KiB), or not on the CPU."""
    if t.device.type != "cpu" or not hugepages_available():
        return t
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes < MIN_BYTES:
        return t
    raw = _alloc(nbytes)
    raw.copy_(torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,)))
    return torch.empty(0, dtype=t.dtype).set_(raw.untyped_storage(),
                                               raw.storage_offset() // t.element_size()
                                               + t.storage_offset(), t.shape, t.stride())


def huge_kb(t: torch.Tensor) -> int | None:
    """The kB of transparent huge pages (``AnonHugePages`` in ``/proc/self/smaps``) backing the
    mapping that holds ``t``'s first byte; None where that cannot be read."""
    addr = t.data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None

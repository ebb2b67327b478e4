"""Random inputs for checking the kernels against their references (tests and programs/gpu_check).

Not used at serving time. Everything is built on the host from a seeded generator, then moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .verify_attention import mask_indptr_from_extend_lens


def random_tree_mask(ext: int, gen: torch.Generator) -> torch.Tensor:
    """``[ext, ext]`` bool of a random tree (node 0 = root, parent of i drawn from 0..i-1):
    each node sees its ancestors and itself."""
    mask = torch.zeros(ext, ext, dtype=torch.bool)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, ext)]
    for i in range(ext):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


@dataclass
class VerifyBatch:
    """Arguments of ``verify_attention`` plus the per-request mask blocks.

    ``q`` has one unused row before, between and after the requests, so a kernel that writes
    outside its rows (or skips a row) is visible when ``out`` is pre-filled with NaN.
    """

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_buf: torch.Tensor  # [num_slots, kv_heads, head_dim]
    v_buf: torch.Tensor  # [num_slots, kv_heads, head_dim]
    req_to_token: torch.Tensor  # [bs + 2, max_ctx] int64, -1 outside requests
    req_pool_indices: torch.Tensor  # [bs] int64
    seq_lens: torch.Tensor  # [bs] int64
    extend_lens: torch.Tensor  # [bs] int64
    extend_start: torch.Tensor  # [bs] int64
    custom_mask: torch.Tensor | None  # flat bool [sum ext^2]
    mask_indptr: torch.Tensor | None  # [bs + 1] int64
    sm_scale: float
    mask_blocks: list[torch.Tensor]  # per request [ext, ext] bool (causal when custom_mask None)

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``verify_attention`` / ``verify_attention_ref``."""
        return {
            "q": self.q, "k_buf": self.k_buf, "v_buf": self.v_buf,
            "req_to_token": self.req_to_token, "req_pool_indices": self.req_pool_indices,
            "seq_lens": self.seq_lens, "extend_lens": self.extend_lens,
            "extend_start": self.extend_start, "custom_mask": self.custom_mask,
            "mask_indptr": self.mask_indptr, "sm_scale": self.sm_scale,
        }

    def owned_rows(self) -> torch.Tensor:
        """``[num_tokens]`` bool: rows of ``q`` that belong to a request."""
        owned = torch.zeros(self.q.shape[0], dtype=torch.bool, device=self.q.device)
        starts, exts = self.extend_start.tolist(), self.extend_lens.tolist()
        for s, e in zip(starts, exts, strict=True):
            owned[s : s + e] = True
        return owned


def make_verify_batch(
    prefix_lens: list[int],
    ext_lens: list[int],
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    mask_kind: str | None,  # None (causal) | "chain" | "tree"
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> VerifyBatch:
    """A paged batch with shuffled slots and shuffled ``req_to_token`` rows."""
    gen = torch.Generator().manual_seed(seed)
    bs = len(ext_lens)
    seq_lens = [p + e for p, e in zip(prefix_lens, ext_lens, strict=True)]
    num_slots = sum(seq_lens) + 7
    req_to_token = torch.full((bs + 2, max(seq_lens) + 3), -1, dtype=torch.int64)
    req_rows = torch.randperm(bs + 2, generator=gen)[:bs]
    slots = torch.randperm(num_slots, generator=gen)
    used = 0
    for row, seq in zip(req_rows.tolist(), seq_lens, strict=True):
        req_to_token[row, :seq] = slots[used : used + seq]
        used += seq
    starts, row_at = [], 1
    for e in ext_lens:
        starts.append(row_at)
        row_at += e + 1
    blocks = []
    for e in ext_lens:
        if mask_kind == "tree":
            blocks.append(random_tree_mask(e, gen))
        elif mask_kind in (None, "chain"):
            blocks.append(torch.ones(e, e, dtype=torch.bool).tril())
        else:
            raise ValueError(f"unknown mask kind {mask_kind!r}")
    ext = torch.tensor(ext_lens, dtype=torch.int64)
    custom_mask = torch.cat([b.flatten() for b in blocks]) if mask_kind else None

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    return VerifyBatch(
        q=rand(row_at, num_heads, head_dim),
        k_buf=rand(num_slots, kv_heads, head_dim),
        v_buf=rand(num_slots, kv_heads, head_dim),
        req_to_token=req_to_token.to(device),
        req_pool_indices=req_rows.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        extend_lens=ext.to(device),
        extend_start=torch.tensor(starts, dtype=torch.int64, device=device),
        custom_mask=custom_mask.to(device) if custom_mask is not None else None,
        mask_indptr=mask_indptr_from_extend_lens(ext).to(device) if mask_kind else None,
        sm_scale=head_dim**-0.5,
        mask_blocks=[b.to(device) for b in blocks],
    )

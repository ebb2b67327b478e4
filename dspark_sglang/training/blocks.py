"""Random-anchor block sampling and the teacher-forced DSpark forward used by training and eval.

A training example is one *block*: anchor position ``p`` of a cached sequence, context = the
target hidden states of tokens ``0 .. p-1``, block rows ``k = 0 .. gamma-1`` supervised with the
token at ``p + k + 1`` and the target distribution ``softmax(lm_head(final_hidden[p + k]))``.
Many blocks of one sequence share that sequence's context K/V (computed once per step): the
packed layout is ``[num_seqs, Lmax]`` context plus ``[num_blocks, gamma]`` block rows that index
their sequence with ``seq_index``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dspark_sglang.speculative.dspark.model import DSparkDrafter
from dspark_sglang.training.target_cache import CachedSequence


@dataclass
class BlockBatch:
    aux_hidden: torch.Tensor  # [S, Lmax, m*H] float32 (zero padded)
    final_hidden: torch.Tensor  # [S, Lmax, H] float32 (zero padded)
    seq_lens: torch.Tensor  # [S] int64
    seq_index: torch.Tensor  # [N] int64, sequence of each block
    anchor_pos: torch.Tensor  # [N] int64
    anchor_ids: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N, gamma] int64 (0 where invalid)
    valid: torch.Tensor  # [N, gamma] bool


def build_block_batch(
    seqs: Sequence[CachedSequence],
    anchors: Sequence[Sequence[int]],
    gamma: int,
) -> BlockBatch:
    """Pack the given anchors (per sequence) into a :class:`BlockBatch`.

    Anchor ``p`` needs ``1 <= p <= len - 2`` (non-empty context and at least one label).
    """
    lmax = max(len(s.input_ids) for s in seqs)
    mh, h = seqs[0].aux_hidden.shape[1], seqs[0].final_hidden.shape[1]
    aux = torch.zeros(len(seqs), lmax, mh)
    fin = torch.zeros(len(seqs), lmax, h)
    seq_index, pos, anc, labels, valid = [], [], [], [], []
    for i, (s, ps) in enumerate(zip(seqs, anchors)):
        n = len(s.input_ids)
        aux[i, :n] = s.aux_hidden.float()
        fin[i, :n] = s.final_hidden.float()
        ids = s.input_ids
        for p in ps:
            assert 1 <= p <= n - 2, f"anchor {p} out of range for length {n}"
            idx = torch.arange(p + 1, p + 1 + gamma)
            ok = idx < n
            seq_index.append(i)
            pos.append(p)
            anc.append(int(ids[p]))
            labels.append(torch.where(ok, ids[idx.clamp(max=n - 1)], torch.zeros_like(idx)))
            valid.append(ok)
    return BlockBatch(
        aux_hidden=aux, final_hidden=fin,
        seq_lens=torch.tensor([len(s.input_ids) for s in seqs]),
        seq_index=torch.tensor(seq_index, dtype=torch.long),
        anchor_pos=torch.tensor(pos, dtype=torch.long),
        anchor_ids=torch.tensor(anc, dtype=torch.long),
        labels=torch.stack(labels).long(), valid=torch.stack(valid))


def sample_anchors(
    seq: CachedSequence, num: int, rng: random.Random, response_only: bool = True,
    max_len: int | None = None,
) -> list[int]:
    """Up to ``num`` distinct random anchors in ``[lo, len - 2]`` (lo = first response anchor)."""
    n = len(seq.input_ids) if max_len is None else min(len(seq.input_ids), max_len)
    lo = max(1, seq.loss_start - 1) if response_only else 1
    hi = n - 2
    if hi < lo:
        return []
    cand = list(range(lo, hi + 1))
    return sorted(rng.sample(cand, min(num, len(cand))))


def truncate(seq: CachedSequence, max_len: int) -> CachedSequence:
    if len(seq.input_ids) <= max_len:
        return seq
    return CachedSequence(seq.key, seq.input_ids[:max_len], seq.aux_hidden[:max_len],
                          seq.final_hidden[:max_len], seq.loss_start)


def block_forward(
    drafter: DSparkDrafter, batch: BlockBatch, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Backbone over packed blocks; returns ``block_hidden [N, gamma, H]`` (differentiable)."""
    s, lmax = batch.aux_hidden.shape[:2]
    positions = torch.arange(lmax, device=device).expand(s, lmax)  # [S, Lmax]
    h_ctx = drafter.project_context(batch.aux_hidden.to(device))  # [S, Lmax, H]
    kv = drafter.context_kv(h_ctx, positions)
    sel = batch.seq_index.to(device)
    ctx_k = [k[sel] for k, _ in kv]  # per layer [N, Lmax, kvh, d]
    ctx_v = [v[sel] for _, v in kv]
    ctx_valid = torch.arange(lmax, device=device)[None, :] < batch.anchor_pos.to(device)[:, None]
    return drafter.forward_block(batch.anchor_ids.to(device), batch.anchor_pos.to(device),
                                 ctx_k, ctx_v, ctx_valid)


def block_forward_packed(
    drafter: DSparkDrafter, batch: BlockBatch, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Same result as :func:`block_forward`, computed per *sequence*: the blocks of a sequence
    are packed into one row of ``A·gamma`` queries over that sequence's context K/V (computed
    once, never copied per block), with a mask that gives each block its own context prefix and
    bidirectional attention inside the block only. Returns ``block_hidden [N, gamma, H]``."""
    g = drafter.gamma
    s_num, lmax = batch.aux_hidden.shape[:2]
    n = batch.seq_index.numel()
    counts = torch.bincount(batch.seq_index, minlength=s_num)  # [S]
    a_max = int(counts.max())
    order = torch.argsort(batch.seq_index, stable=True)  # blocks grouped by sequence
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty(n, dtype=torch.long)
    slot[order] = torch.arange(n) - starts[batch.seq_index[order]]  # block's index in its seq
    flat = batch.seq_index * a_max + slot  # [N] position in the [S * A] block grid
    real = torch.zeros(s_num * a_max, dtype=torch.bool)
    real[flat] = True
    anchor_pos = torch.zeros(s_num * a_max, dtype=torch.long)
    anchor_pos[flat] = batch.anchor_pos
    anchor_ids = torch.zeros(s_num * a_max, dtype=torch.long)
    anchor_ids[flat] = batch.anchor_ids

    dev = torch.device(device)
    x = drafter.embed_tokens(drafter.block_input_ids(anchor_ids.to(dev))).to(
        drafter.fc.weight.dtype)  # [S*A, g, H]
    x = x.view(s_num, a_max * g, -1)
    positions = (anchor_pos[:, None] + torch.arange(g)[None, :]).view(s_num, a_max * g).to(dev)
    ctx_pos = torch.arange(lmax, device=dev).expand(s_num, lmax)
    kv = drafter.context_kv(drafter.project_context(batch.aux_hidden.to(dev)), ctx_pos)
    # mask rows: (block a, row j); ctx column c visible iff c < anchor of block a (padding
    # blocks see nothing there); block columns visible iff same block
    ap = anchor_pos.view(s_num, a_max).to(dev)
    ctx_ok = torch.arange(lmax, device=dev)[None, None, :] < ap[:, :, None]  # [S, A, L]
    ctx_ok = ctx_ok & real.view(s_num, a_max, 1).to(dev)
    ctx_ok = ctx_ok[:, :, None, :].expand(s_num, a_max, g, lmax).reshape(s_num, a_max * g, lmax)
    blk = torch.arange(a_max * g, device=dev) // g
    same = (blk[:, None] == blk[None, :]).expand(s_num, a_max * g, a_max * g)
    mask = torch.cat([ctx_ok, same], dim=-1)[:, None]  # [S, 1, A*g, L + A*g]
    for layer, (k_l, v_l) in zip(drafter.layers, kv):
        x = x + layer.self_attn(layer.input_layernorm(x), positions, k_l, v_l, mask,
                                drafter.inv_freq)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    out = drafter.norm(x).view(s_num * a_max, g, -1)
    return out[flat.to(dev)]


def target_block_logits(
    lm_head: Callable[[torch.Tensor], torch.Tensor], batch: BlockBatch, gamma: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Target logits for every block row: ``lm_head(final_hidden[p + k])`` -> ``[N, gamma, V]``."""
    rows = target_block_hidden(batch, gamma)  # [N, gamma, H]
    with torch.no_grad():
        return lm_head(rows.to(device)).float()


def target_block_hidden(batch: BlockBatch, gamma: int) -> torch.Tensor:
    """Target final hidden at every block row, ``final_hidden[p + k]``: ``[N, gamma, H]``."""
    lmax = batch.final_hidden.shape[1]
    idx = (batch.anchor_pos[:, None] + torch.arange(gamma)[None, :]).clamp(max=lmax - 1)
    return batch.final_hidden[batch.seq_index[:, None], idx]


def prev_tokens(batch: BlockBatch) -> torch.Tensor:
    """Teacher-forced previous tokens ``[anchor, y_1, .., y_{gamma-1}]``: ``[N, gamma]``."""
    return torch.cat([batch.anchor_ids[:, None], batch.labels[:, :-1]], dim=1)

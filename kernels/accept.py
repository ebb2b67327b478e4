"""Greedy acceptance of speculative drafts against the target's argmax tokens.

Chain: request ``b`` proposed ``draft_tokens[b, :draft_lens[b]]`` (padded to ``L``);
``target_argmax[b, j]`` is the target's greedy token after the anchor and the first ``j`` drafts
(``j = 0..L``). ``num_accepted[b]`` is the length of the longest prefix with
``draft == target``; ``out_tokens[b, :num_accepted[b] + 1]`` are the accepted drafts followed by
the bonus token ``target_argmax[b, num_accepted[b]]``, the rest is ``pad`` (-1).

Tree: node 0 of request ``b`` is the root (the anchor, already verified; its token is ignored);
node ``i`` in ``1..num_nodes[b]-1`` carries ``tree_tokens[b, i]`` and has parent
``parents[b, i] < i``. ``target_argmax[b, i]`` is the target's greedy token after node ``i``.
Walking from the root, a child is accepted when its token equals the target's token at its parent
(the lowest-index child wins if several match). Outputs: ``num_accepted`` (accepted nodes, root
excluded), ``accepted_path[b, :num_accepted + 1]`` node indices starting with 0, and
``out_tokens[b, :num_accepted + 1]`` accepted tokens followed by the bonus token; ``pad`` elsewhere.

Triton and torch versions share signatures; the Triton ones never synchronise with the host.
"""

from __future__ import annotations

import torch

from ._runtime import check_launchable

PAD = -1


def _check_chain(draft: torch.Tensor, draft_lens: torch.Tensor, target: torch.Tensor) -> None:
    assert draft.dim() == 2 and target.dim() == 2, (draft.shape, target.shape)
    bs, L = draft.shape
    assert target.shape == (bs, L + 1), f"target_argmax must be [{bs}, {L + 1}], got {target.shape}"
    assert draft_lens.shape == (bs,), draft_lens.shape


def greedy_accept_chain(
    draft_tokens: torch.Tensor,  # [bs, L] int64, padded
    draft_lens: torch.Tensor,  # [bs] int, 0 <= draft_lens <= L
    target_argmax: torch.Tensor,  # [bs, L + 1] int64
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [bs] int64, out_tokens [bs, L + 1] int64
    """Triton implementation (one program per request)."""
    _check_chain(draft_tokens, draft_lens, target_argmax)
    bs, L = draft_tokens.shape
    num_accepted = torch.empty(bs, dtype=torch.int64, device=draft_tokens.device)
    out_tokens = torch.empty(bs, L + 1, dtype=torch.int64, device=draft_tokens.device)
    if bs == 0:
        return num_accepted, out_tokens
    check_launchable(draft_tokens, draft_lens, target_argmax)
    draft = draft_tokens.to(torch.int64).contiguous()
    target = target_argmax.to(torch.int64).contiguous()
    from .jit.accept import chain_accept_kernel  # imports triton

    chain_accept_kernel[(bs,)](
        draft, draft_lens, target, num_accepted, out_tokens, L,
        draft.stride(0), target.stride(0), out_tokens.stride(0),
        PAD=PAD, BLOCK=max(16, 1 << L.bit_length()),
    )
    return num_accepted, out_tokens


def greedy_accept_chain_ref(
    draft_tokens: torch.Tensor,  # [bs, L] int64, padded
    draft_lens: torch.Tensor,  # [bs] int, 0 <= draft_lens <= L
    target_argmax: torch.Tensor,  # [bs, L + 1] int64
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [bs] int64, out_tokens [bs, L + 1] int64
    """Torch reference (vectorised, no host sync)."""
    _check_chain(draft_tokens, draft_lens, target_argmax)
    L = draft_tokens.shape[1]
    positions = torch.arange(L + 1, device=draft_tokens.device)
    match = (draft_tokens == target_argmax[:, :L]) & (positions[:L] < draft_lens[:, None])
    num_accepted = match.to(torch.int64).cumprod(1).sum(1)
    keep = positions[None, :] <= num_accepted[:, None]
    out_tokens = torch.where(keep, target_argmax.to(torch.int64), PAD)
    return num_accepted, out_tokens


def _check_tree(
    tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor, target: torch.Tensor
) -> None:
    assert tokens.dim() == 2 and parents.shape == tokens.shape == target.shape, (
        tokens.shape, parents.shape, target.shape)
    assert num_nodes.shape == (tokens.shape[0],), num_nodes.shape


def greedy_accept_tree(
    tree_tokens: torch.Tensor,  # [bs, N] int64, node 0 = root
    parents: torch.Tensor,  # [bs, N] int, parents[b, i] < i for 1 <= i < num_nodes[b]
    num_nodes: torch.Tensor,  # [bs] int, 1 <= num_nodes <= N
    target_argmax: torch.Tensor,  # [bs, N] int64, target token after each node
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation: ``(num_accepted [bs], accepted_path [bs, N], out_tokens [bs, N])``."""
    _check_tree(tree_tokens, parents, num_nodes, target_argmax)
    bs, n = tree_tokens.shape
    device = tree_tokens.device
    num_accepted = torch.empty(bs, dtype=torch.int64, device=device)
    path = torch.empty(bs, n, dtype=torch.int64, device=device)
    out_tokens = torch.empty(bs, n, dtype=torch.int64, device=device)
    if bs == 0:
        return num_accepted, path, out_tokens
    check_launchable(tree_tokens, parents, num_nodes, target_argmax)
    tokens = tree_tokens.to(torch.int64).contiguous()
    parents = parents.to(torch.int64).contiguous()
    target = target_argmax.to(torch.int64).contiguous()
    from .jit.accept import tree_accept_kernel  # imports triton

    tree_accept_kernel[(bs,)](
        tokens, parents, num_nodes, target, num_accepted, path, out_tokens, n,
        tokens.stride(0), parents.stride(0), target.stride(0), path.stride(0),
        out_tokens.stride(0),
        PAD=PAD, BLOCK=max(16, 1 << (n - 1).bit_length()),
    )
    return num_accepted, path, out_tokens


def greedy_accept_tree_ref(
    tree_tokens: torch.Tensor,  # [bs, N] int64, node 0 = root
    parents: torch.Tensor,  # [bs, N] int, parents[b, i] < i for 1 <= i < num_nodes[b]
    num_nodes: torch.Tensor,  # [bs] int, 1 <= num_nodes <= N
    target_argmax: torch.Tensor,  # [bs, N] int64, target token after each node
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference (host loop over requests and tree levels)."""
    _check_tree(tree_tokens, parents, num_nodes, target_argmax)
    bs, n = tree_tokens.shape
    tokens_l, parents_l = tree_tokens.tolist(), parents.tolist()
    target_l, sizes = target_argmax.tolist(), num_nodes.tolist()
    num_accepted = torch.zeros(bs, dtype=torch.int64)
    path = torch.full((bs, n), PAD, dtype=torch.int64)
    out_tokens = torch.full((bs, n), PAD, dtype=torch.int64)
    for b in range(bs):
        size = min(sizes[b], n)
        walk, emitted = [0], []
        while True:
            tip = walk[-1]
            wanted = target_l[b][tip]
            child = next((i for i in range(1, size)
                          if parents_l[b][i] == tip and tokens_l[b][i] == wanted), None)
            if child is None:
                break
            walk.append(child)
            emitted.append(wanted)
        emitted.append(target_l[b][walk[-1]])
        num_accepted[b] = len(walk) - 1
        path[b, : len(walk)] = torch.tensor(walk)
        out_tokens[b, : len(emitted)] = torch.tensor(emitted)
    device = tree_tokens.device
    return num_accepted.to(device), path.to(device), out_tokens.to(device)

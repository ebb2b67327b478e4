"""DSpark sequential heads: a low-rank transition bias added to the block logits left to right.

All variants share ``markov_w1`` (an embedding ``V x r`` of the previous token) and ``markov_w2``
(``Linear(r, V)``, weight ``[V, r]``); tensor names are DeepSpec's
(``deepspec/modeling/dspark/markov_head.py``). For block row ``k`` with previous token
``x_{k-1}`` (the anchor for ``k = 0``) and backbone hidden ``h_k``:

- vanilla: ``bias_k = W2 · W1[x_{k-1}]``
- gated:   ``g_k = sigmoid(G · [h_k ; W1[x_{k-1}]] + b_g)`` (``r`` gates),
           ``bias_k = W2 · (g_k ⊙ W1[x_{k-1}])``  (``gate_proj``: ``Linear(H + r, r)``)
- rnn:     ``[a; c; o] = J · [s_{k-1} ; W1[x_{k-1}] ; h_k] + b_J`` (``joint_proj``:
           ``Linear(2r + H, 3r)``), ``s_k = sigmoid(a) ⊙ s_{k-1} + (1 - sigmoid(a)) ⊙ tanh(c)``,
           ``s_0 = 0``, ``bias_k = W2 · tanh(o)``

The gated and rnn formulas are the ones DeepSpec's ``GatedMarkovHead`` / ``RNNHead`` implement.
"""

from __future__ import annotations

import torch
from torch import nn


class MarkovHead(nn.Module):
    """Base (vanilla) head. ``step`` is the one entry point sampling uses."""

    head_type = "vanilla"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size, self.rank, self.hidden_size = vocab_size, rank, hidden_size
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def prev_embedding(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """``W1[prev]``: ``[...] int64 -> [..., r]``."""
        return self.markov_w1(prev_tokens.long())

    def bias(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Vanilla bias ``W2 · W1[prev]``: ``[...] -> [..., V]``."""
        return self.markov_w2(self.prev_embedding(prev_tokens))

    def init_state(self, batch_shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor | None:
        """Recurrent state before block row 0 (None for memoryless heads)."""
        return None

    def rank_step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block row's input to ``markov_w2``: (``u [..., r]``, state); bias = ``W2 · u``."""
        del hidden
        return self.prev_embedding(prev_tokens), state

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block row: ``prev_tokens [...]``, ``hidden [..., H]`` -> (``bias [..., V]``,
        state)."""
        u, state = self.rank_step(prev_tokens, hidden, state)
        return self.markov_w2(u), state

    def block_rank_input(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced ``u`` for whole blocks (training): ``[..., k]``, ``[..., k, H]`` ->
        ``[..., k, r]``; row ``j`` of ``prev_tokens`` holds ``x_{j-1}`` (row 0 the anchor)."""
        state = self.init_state(tuple(prev_tokens.shape[:-1]), hidden)
        out = []
        for j in range(prev_tokens.shape[-1]):
            u, state = self.rank_step(prev_tokens[..., j], hidden[..., j, :], state)
            out.append(u)
        return torch.stack(out, dim=-2)

    def block_bias(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced bias for whole blocks (training): ``[..., k, V]``."""
        return self.markov_w2(self.block_rank_input(prev_tokens, hidden))


class VanillaMarkovHead(MarkovHead):
    def block_rank_input(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.prev_embedding(prev_tokens)  # memoryless: one batched call


class GatedMarkovHead(MarkovHead):
    head_type = "gated"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank, hidden_size)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def rank_step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = self.prev_embedding(prev_tokens)  # [..., r]
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden.to(e.dtype), e], dim=-1)))
        return gate * e, state

    def block_rank_input(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.rank_step(prev_tokens, hidden, None)[0]  # memoryless: one batched call


class RNNMarkovHead(MarkovHead):
    head_type = "rnn"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank, hidden_size)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def init_state(self, batch_shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros(*batch_shape, self.rank, dtype=self.markov_w1.weight.dtype,
                           device=ref.device)

    def rank_step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = self.prev_embedding(prev_tokens)  # [..., r]
        if state is None:
            state = torch.zeros_like(e)
        a, c, o = self.joint_proj(torch.cat([state, e, hidden.to(e.dtype)], dim=-1)).chunk(3, -1)
        g = torch.sigmoid(a)
        new_state = g * state + (1.0 - g) * torch.tanh(c)
        return torch.tanh(o), new_state


def build_markov_head(
    head_type: str, vocab_size: int, rank: int, hidden_size: int
) -> MarkovHead | None:
    """The head named by ``markov_head_type`` (None when ``rank == 0``)."""
    if rank == 0:
        return None
    classes: dict[str, type[MarkovHead]] = {
        "vanilla": VanillaMarkovHead, "gated": GatedMarkovHead, "rnn": RNNMarkovHead,
    }
    if head_type not in classes:
        raise ValueError(f"unknown markov_head_type {head_type!r}; known: {sorted(classes)}")
    return classes[head_type](vocab_size, rank, hidden_size)

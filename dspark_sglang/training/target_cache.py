"""Target hidden-state cache for drafter training.

For every training sequence the frozen target runs one EXTEND forward (sequences batched, our
own small KV pool) and we keep, per token, the residual stream after each layer in
``target_layer_ids`` (concatenated, ``[n, m * H]``) and the final post-norm hidden state
(``[n, H]``). The LM head is *not* applied here: training applies it on the fly at the sampled
block positions (as DeepSpec does), which keeps the cache ~8x smaller than storing logits.

On disk (``cache_dir``): ``shard_00000.safetensors`` ... each with

- ``input_ids [N] int32``, ``aux_hidden [N, m*H] bf16``, ``final_hidden [N, H] bf16`` (the
  tokens of all sequences of the shard, concatenated),
- ``offsets [S + 1] int64`` (sequence ``s`` is rows ``offsets[s]:offsets[s+1]``),
- ``loss_start [S] int64`` (index of the first response token of each sequence),

and ``index.json`` listing shards, their sample keys and the layer ids. A rerun skips sample keys
already cached (resumable); an interrupted shard is simply not in the index and is redone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dspark_sglang.core.forward_batch import ForwardMode
from dspark_sglang.layers.attention.base import create_attention_backend
from dspark_sglang.mem_cache.kv_pool import KVPool
from dspark_sglang.model_executor.model_runner import BatchRequestSpec, build_forward_batch
from dspark_sglang.models.llama import LlamaForCausalLM
from dspark_sglang.training.data import Sample

INDEX_FILE = "index.json"


class TargetHiddenExtractor:
    """Runs whole sequences through the target and returns captured hidden states.

    Owns a private KV pool sized for ``max_batch_tokens``; every call reuses the same slots
    (sequences are independent full prefills, nothing is kept between calls).
    """

    def __init__(self, model: LlamaForCausalLM, layer_ids: Sequence[int],
                 max_batch_tokens: int = 4096, max_seq_len: int = 2048) -> None:
        cfg = model.config
        if any(i < 0 or i >= cfg.num_hidden_layers for i in layer_ids):
            raise ValueError(f"layer ids {list(layer_ids)} outside [0, {cfg.num_hidden_layers})")
        self.model = model
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_len = max_seq_len
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.kv_pool = KVPool(cfg.num_hidden_layers, max_batch_tokens, cfg.num_key_value_heads,
                              cfg.head_dim, dtype, device)
        self.attn = create_attention_backend("torch_native")
        self.max_reqs = 256
        self.req_to_token = torch.zeros((self.max_reqs, max_seq_len), dtype=torch.int64)

    @torch.inference_mode()
    def run(self, seqs: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence ``(aux_hidden [L, m*H], final_hidden [L, H])`` in the model's dtype.

        The batch must fit: total tokens <= ``max_batch_tokens``, each <= ``max_seq_len``.
        """
        total = sum(len(s) for s in seqs)
        assert total <= self.max_batch_tokens and len(seqs) <= self.max_reqs, "batch too large"
        specs, start = [], 1  # slot 0 is the padding slot
        for i, s in enumerate(seqs):
            assert 0 < len(s) <= self.max_seq_len, "sequence length out of range"
            slots = torch.arange(start, start + len(s), dtype=torch.int64)
            self.req_to_token[i, : len(s)] = slots
            specs.append(BatchRequestSpec(i, [int(t) for t in s], 0, slots))
            start += len(s)
        fb = build_forward_batch(ForwardMode.EXTEND, specs, self.req_to_token,
                                 logits_indices=torch.zeros(0, dtype=torch.int64),
                                 capture_layer_ids=self.layer_ids, capture_final_hidden=True)
        out = self.model(fb, self.attn, self.kv_pool)
        assert out.aux_hidden is not None and out.final_hidden is not None
        res, row = [], 0
        for s in seqs:
            res.append((out.aux_hidden[row : row + len(s)], out.final_hidden[row : row + len(s)]))
            row += len(s)
        return res


def _pack_batches(samples: Sequence[Sample], max_tokens: int) -> list[list[Sample]]:
    batches: list[list[Sample]] = [[]]
    used = 0
    for s in samples:
        n = len(s.ids)
        if batches[-1] and used + n > max_tokens:
            batches.append([])
            used = 0
        batches[-1].append(s)
        used += n
    return [b for b in batches if b]


def build_target_cache(
    extractor: TargetHiddenExtractor,
    samples: Sequence[Sample],
    cache_dir: str | Path,
    shard_tokens: int = 16384,
    store_dtype: torch.dtype = torch.bfloat16,
    log: Any = print,
) -> dict[str, float]:
    """Cache every sample not yet in ``cache_dir``; returns ``{"new_tokens", "seconds", ...}``.

    Sequences longer than the extractor's ``max_seq_len`` are truncated.
    """
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = read_index(out)
    if index["layer_ids"] and list(index["layer_ids"]) != list(extractor.layer_ids):
        raise ValueError(f"cache has layer ids {index['layer_ids']}, extractor "
                         f"{list(extractor.layer_ids)}: use another cache_dir")
    index["layer_ids"] = list(extractor.layer_ids)
    done = {k for sh in index["shards"] for k in sh["keys"]}
    todo = [s for s in samples if s.key not in done]
    t0 = time.monotonic()
    new_tokens = 0
    lim = min(extractor.max_seq_len, extractor.max_batch_tokens)
    todo = [Sample(s.key, s.prompt_ids[:lim], s.output_ids[: max(0, lim - len(s.prompt_ids))],
                   s.domain, s.temperature) for s in todo]
    for shard in _pack_batches(todo, shard_tokens):
        ids_l, aux_l, fin_l, offs, starts, keys = [], [], [], [0], [], []
        for batch in _pack_batches(shard, extractor.max_batch_tokens):
            for s, (aux, fin) in zip(batch, extractor.run([s.ids for s in batch])):
                ids_l.append(torch.tensor(s.ids, dtype=torch.int32))
                aux_l.append(aux.to(store_dtype).cpu())
                fin_l.append(fin.to(store_dtype).cpu())
                offs.append(offs[-1] + len(s.ids))
                starts.append(len(s.prompt_ids))
                keys.append(s.key)
        name = f"shard_{len(index['shards']):05d}.safetensors"
        save_file({"input_ids": torch.cat(ids_l), "aux_hidden": torch.cat(aux_l),
                   "final_hidden": torch.cat(fin_l),
                   "offsets": torch.tensor(offs, dtype=torch.int64),
                   "loss_start": torch.tensor(starts, dtype=torch.int64)}, str(out / name))
        index["shards"].append({"file": name, "keys": keys, "num_tokens": offs[-1]})
        (out / INDEX_FILE).write_text(json.dumps(index))
        new_tokens += offs[-1]
        dt = time.monotonic() - t0
        log(f"[cache] {name}: {len(keys)} seqs, {offs[-1]} tokens, "
            f"{new_tokens / max(dt, 1e-9):.0f} tok/s")
    dt = time.monotonic() - t0
    return {"new_tokens": float(new_tokens), "seconds": dt,
            "tokens_per_s": new_tokens / max(dt, 1e-9)}


def read_index(cache_dir: str | Path) -> dict[str, Any]:
    p = Path(cache_dir) / INDEX_FILE
    if not p.exists():
        return {"layer_ids": [], "shards": []}
    return json.loads(p.read_text())


@dataclass
class CachedSequence:
    """One cached sequence (views into a loaded shard)."""

    key: str
    input_ids: torch.Tensor  # [L] int64
    aux_hidden: torch.Tensor  # [L, m*H] bf16
    final_hidden: torch.Tensor  # [L, H] bf16
    loss_start: int


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of the file mapped read-only (pages come from
    the page cache on use and can be evicted again): a cache larger than RAM still trains
    (session 13: 26 GB of shards, 24 GB of RAM). Values are exactly ``load_file``'s; a tensor
    whose offset does not suit its dtype's alignment is copied."""
    size = path.stat().st_size
    raw = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    n = int.from_bytes(bytes(raw[:8].tolist()), "little")
    header = json.loads(bytes(raw[8:8 + n].tolist()).decode())
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:  # (not one this cache writes)
            return load_file(str(path))
        a, b = info["data_offsets"]
        chunk = raw[base + a: base + b]
        item = torch.empty((), dtype=dtype).element_size()
        if (base + a) % item:
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).view(info["shape"])
    return out


def load_target_cache(cache_dir: str | Path) -> tuple[list[int], list[CachedSequence]]:
    """``(layer_ids, sequences)`` of every indexed shard, mapped from disk
    (:func:`_map_safetensors`)."""
    index = read_index(cache_dir)
    seqs: list[CachedSequence] = []
    for sh in index["shards"]:
        t = _map_safetensors(Path(cache_dir) / sh["file"])
        offs = t["offsets"].tolist()
        for i, key in enumerate(sh["keys"]):
            a, b = offs[i], offs[i + 1]
            seqs.append(CachedSequence(key, t["input_ids"][a:b].long(), t["aux_hidden"][a:b],
                                       t["final_hidden"][a:b], int(t["loss_start"][i])))
    return list(index["layer_ids"]), seqs

"""Read llama.cpp GGUF checkpoints into HF-named float32 state dicts.

What llama.cpp's ``convert_hf_to_gguf`` changes, and how each change is undone here:

- names: ``blk.N.attn_q`` etc. are mapped back to HF transformers names (``_LAYER_NAMES``);
- quantisation: every tensor is dequantised to float32 with ``gguf.quants.dequantize``;
- rotary layout: for ``llama`` the rows of ``q_proj``/``k_proj`` are permuted per head from HF's
  half-split layout to interleaved pairs; ``_unpermute_rows`` restores HF's layout. ``qwen2`` and
  ``qwen3`` use the NeoX layout in llama.cpp and are stored unpermuted;
- tied embeddings: no ``output.weight`` in the file means ``tie_word_embeddings``.

A checkpoint may also be split into parts that are a plain byte concatenation of one GGUF file
(``resolve_gguf_file`` joins them into a cache file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark_sglang.models.config import ModelConfig

GGUF_MAGIC = b"GGUF"
GGUF_ARCH_TO_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# llama.cpp per-layer tensor stem -> HF module path inside ``model.layers.N``
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")
# tensors llama.cpp writes that the HF model does not have (precomputed RoPE tables)
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def gguf_to_hf_name(name: str) -> str | None:
    """HF transformers name of a llama.cpp tensor name, or None when it has no HF counterpart."""
    m = _LAYER_RE.match(name)
    if m:
        layer, stem, kind = m.groups()
        hf = _LAYER_NAMES.get(stem)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    m = _GLOBAL_RE.match(name)
    if m:
        hf = _GLOBAL_NAMES.get(m.group(1))
        return None if hf is None else f"{hf}.{m.group(2)}"
    return None


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation for one projection.

    llama.cpp reorders the ``head_dim`` rows of every head from ``[first half | second half]``
    (HF rotate-half RoPE) to interleaved ``(x0, x_half), (x1, x_half+1), ...`` pairs. Viewing the
    rows as ``[n_head, head_dim/2, 2]`` and swapping the last two axes puts them back.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    # [n_head, half, 2, *rest] -> [n_head, 2, half, *rest]
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# file discovery and multi-part joining


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _has_magic(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_parts(model_path: str | Path) -> list[Path] | None:
    """The files that make up the GGUF checkpoint at ``model_path``, in byte order, or None.

    ``model_path`` may be a ``.gguf`` file, a directory holding exactly one ``*.gguf`` file, or a
    directory of part files (only the first starts with the GGUF magic; natural sort order of their
    names is the byte order). Returns None when the path holds no GGUF checkpoint.
    """
    p = Path(model_path)
    if p.is_file():
        return [p] if _has_magic(p) else None
    if not p.is_dir():
        return None
    whole = sorted(p.glob("*.gguf"), key=_natural_key)
    if len(whole) == 1:
        return whole
    if len(whole) > 1 and all(_has_magic(w) for w in whole):
        raise ValueError(
            f"model_path {str(model_path)!r} holds several GGUF files {[w.name for w in whole]}; "
            "pass the one to load (llama.cpp split checkpoints are not supported)"
        )
    part_re = re.compile(r"part\D*\d+", re.IGNORECASE)
    files = [f for f in p.iterdir() if f.is_file() and part_re.search(f.name)]
    files.sort(key=_natural_key)
    if files and _has_magic(files[0]) and not any(_has_magic(f) for f in files[1:]):
        return files
    return None


def parts_fingerprint(parts: list[Path]) -> str:
    """Hex digest of the parts' resolved paths, sizes and mtimes (the cache key)."""
    h = hashlib.sha256()
    for part in parts:
        st = part.stat()
        h.update(f"{part.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def join_parts(parts: list[Path], dest: Path) -> Path:
    """Concatenate ``parts`` into ``dest`` (written atomically) unless it is a single file."""
    if len(parts) == 1:
        return parts[0]
    if dest.exists() and dest.stat().st_size == sum(p.stat().st_size for p in parts):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    tmp.replace(dest)
    return dest


# --------------------------------------------------------------------------------------------
# metadata


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
               10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first), i.e. ggml ``ne`` reversed
    ggml_type: int
    data: np.ndarray  # [*shape[:-1], row_bytes] uint8 view into the mapped file


class _Cursor:
    """Little-endian reader over a byte buffer (GGUF v2/v3)."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[etype])
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Parse a GGUF file's metadata and tensor directory without copying tensor data.

    (Faster than ``gguf.GGUFReader`` on large vocabularies, whose per-element parsing dominates
    conversion time.) Tensor data are read-only uint8 views into a memory map of the file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} in {str(path)!r}")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        ne = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        raw.append((name, ne, cur.scalar("<I"), cur.scalar("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors = []
    for name, ne, gtype, offset in raw:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        row_bytes = ne[0] // block * type_size
        n_rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        start = data_start + offset
        data = buf[start:start + row_bytes * n_rows].reshape(*reversed(ne[1:]), row_bytes)
        tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(ne)), gtype, data))
    return meta, tensors


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A dequantised GGUF checkpoint: HF-named float32 tensors plus the file's metadata."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # HF names, float32; no lm_head.weight when tied
    metadata: dict[str, Any]


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build a ``ModelConfig`` from GGUF metadata of a llama / qwen2 / qwen3 checkpoint."""
    arch = meta.get("general.architecture")
    family = GGUF_ARCH_TO_FAMILY.get(str(arch))
    if family is None:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {sorted(GGUF_ARCH_TO_FAMILY)}"
        )
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"GGUF architecture {arch!r} with per-frequency RoPE factors (llama3-style rope "
            "scaling) is not supported"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    hidden = int(get("embedding_length"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        orig = get("rope.scaling.original_context_length")
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        if key in meta and int(meta[key]) not in eos_ids:
            eos_ids.append(int(meta[key]))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm=family == "qwen3",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
    )


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Dequantise every tensor of the single GGUF file ``path`` into an HF-named state dict.

    Tensors come back float32 and contiguous, with llama's Q/K permutation undone. When the file
    has no ``output.weight`` the result has no ``lm_head.weight`` and ``tie_word_embeddings`` is
    set. Unknown tensor names raise ValueError (silently dropping weights would corrupt outputs).
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    meta, tensors = read_gguf(path)
    names = {t.name for t in tensors}
    config = config_from_metadata(meta, names)
    permuted = meta["general.architecture"] == "llama"
    state: dict[str, torch.Tensor] = {}
    for t in tensors:
        if t.name in _IGNORED:
            continue
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            raise ValueError(f"GGUF tensor {t.name!r} has no HF counterpart (file {path})")
        w = dequantize(t.data, GGMLQuantizationType(t.ggml_type)).reshape(t.shape)  # float32
        if permuted and ".self_attn.q_proj." in hf_name:
            w = _unpermute_rows(w, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            w = _unpermute_rows(w, config.num_key_value_heads)
        state[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32))  # owned copy
    return GGUFCheckpoint(config=config, state_dict=state, metadata=meta)


# --------------------------------------------------------------------------------------------
# tokenizer files

# pre-tokenizer split patterns by ``tokenizer.ggml.pre`` (the regexes these vocabularies' merges
# were learned with); ``None`` means GPT-2's own pattern inside the ByteLevel pre-tokenizer
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_PRE_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "smollm": None,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_tokenizer(meta: dict[str, Any]) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF ``gpt2``-model metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from dspark_sglang.models.tokenizer import byte_to_unicode_table

    alphabet = byte_to_unicode_table()
    spelled = set(alphabet.values())
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {
        (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _BPE_PRE_SPLITS[meta.get("tokenizer.ggml.pre", "default")]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= spelled
    ])
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab
    ])
    return tok


def _set_bos_post_processor(tok: Any, bos: str | None, bos_id: int | None, add: bool) -> None:
    from tokenizers import processors

    if add and bos is not None and bos_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )


def write_gguf_tokenizer_files(
    meta: dict[str, Any], gguf_path: str | Path, out_dir: str | Path
) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` for a GGUF checkpoint into ``out_dir``.

    Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``, e.g. SmolLM2, Qwen2.5) with a
    known pre-tokenizer are built here with ``tokenizers`` alone. Anything else (sentencepiece
    ``llama`` vocabularies, unknown pre-tokenizers) is converted once with transformers' GGUF
    tokenizer converter, which then must be installed.
    """
    out = Path(out_dir)
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError(f"GGUF file {str(gguf_path)!r} carries no tokenizer")
    model = meta.get("tokenizer.ggml.model")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = model == "llama"  # llama.cpp's default for sentencepiece vocabularies
    tcfg: dict[str, Any] = {"add_bos_token": bool(add_bos)}
    for key, meta_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        idx = meta.get(f"tokenizer.ggml.{meta_key}")
        if idx is not None and 0 <= int(idx) < len(tokens):
            tcfg[key] = tokens[int(idx)]
    if meta.get("tokenizer.chat_template"):
        tcfg["chat_template"] = meta["tokenizer.chat_template"]

    if model == "gpt2" and meta.get("tokenizer.ggml.pre", "default") in _BPE_PRE_SPLITS:
        tok = _byte_level_tokenizer(meta)
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        _set_bos_post_processor(tok, tcfg.get("bos_token"), bos_id, bool(add_bos))
        tok.save(str(out / "tokenizer.json"))
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError(
                f"GGUF tokenizer model {model!r} (pre {meta.get('tokenizer.ggml.pre')!r}) needs a "
                "one-time conversion with transformers: pip install transformers"
            ) from e
        p = Path(gguf_path)
        hf_tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        hf_tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# quantised blocks kept as they are (--quantization gguf)


@dataclass(frozen=True)
class GGUFBlocks:
    """One 2-D weight kept in its GGUF block format: ``data [out, row_bytes]`` uint8 (owned)."""

    ggml_type: int
    shape: tuple[int, int]  # (out_features, in_features)
    data: torch.Tensor


def load_gguf_blocks(path: str | Path, ggml_types: set[int]) -> dict[str, GGUFBlocks]:
    """The 2-D weights of ``path`` stored in one of ``ggml_types``, as HF-named block rows.

    Rows are whole blocks, so llama's Q/K row permutation is undone on the byte rows exactly as
    on the dequantised values. Tensors in other formats (F32, F16, unsupported quants) are left
    out: callers keep the float weights for them.
    """
    meta, tensors = read_gguf(path)
    permuted = meta["general.architecture"] == "llama"
    arch = meta["general.architecture"]
    n_heads = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    out: dict[str, GGUFBlocks] = {}
    for t in tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None or len(t.shape) != 2 or t.ggml_type not in ggml_types:
            continue
        rows = np.asarray(t.data)  # [out, row_bytes]
        if permuted and ".self_attn.q_proj." in hf_name:
            rows = _unpermute_rows(rows, n_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            rows = _unpermute_rows(rows, n_kv)
        data = torch.from_numpy(np.array(rows, dtype=np.uint8))  # owned, contiguous copy
        out[hf_name] = GGUFBlocks(t.ggml_type, (int(t.shape[0]), int(t.shape[1])), data)
    return out

"""Peer systems on the same weights and prompts: transformers ``generate`` and llama.cpp.

Each peer is optional. ``peer_unavailable(name)`` returns None when it can run, else a message
saying what to install; the benchmarks print that message and skip the peer. Peers run one
request at a time (concurrency 1), which is how both are normally used on a CPU.

transformers variants: ``hf`` (plain greedy/sampled ``generate``), ``hf-prompt-lookup``
(``prompt_lookup_num_tokens``), ``hf-assisted`` (``assistant_model``, a same-tokenizer small LM).
llama.cpp variants (``llama-cpp-python`` on the GGUF itself): ``llamacpp`` and
``llamacpp-prompt-lookup`` (``LlamaPromptLookupDecoding``).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from dspark_sglang.benchmark.metrics import RequestResult
from dspark_sglang.benchmark.report import error_text

PEERS = ("hf", "hf-prompt-lookup", "hf-assisted", "llamacpp", "llamacpp-prompt-lookup",
         "sglang")
_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def hf_model_dir(model_path: str | None) -> Path:
    """The HF directory (config.json + safetensors) holding ``model_path``'s weights: the
    directory itself, or our GGUF conversion cache (converted now if absent)."""
    from dspark_sglang.models.default_model import default_model_path
    from dspark_sglang.models.gguf_loader import gguf_parts
    from dspark_sglang.models.loader import gguf_cache_dir, load_model_files

    path = model_path or default_model_path()
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    parts = gguf_parts(p) if p.exists() else None
    if not parts:
        raise ValueError(f"model_path {path!r} is neither an HF directory nor a GGUF checkpoint")
    out = gguf_cache_dir(parts)
    if not (out / "config.json").is_file():
        load_model_files(path)
    return out


def gguf_file(model_path: str | None) -> Path | None:
    """A single GGUF file for llama.cpp, or None (HF directories, multi-part GGUF)."""
    from dspark_sglang.models.default_model import default_model_path

    p = Path(model_path or default_model_path()).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def peer_unavailable(name: str, model_path: str | None = None,
                     assistant_path: str | None = None) -> str | None:
    """None when peer ``name`` can run here, else why not (with the install command)."""
    if name not in PEERS:
        return f"unknown peer {name!r}; expected one of {list(PEERS)}"
    if name.startswith("hf"):
        if importlib.util.find_spec("transformers") is None:
            return "skipped: transformers is not installed (pip install transformers)"
        if name == "hf-assisted" and not assistant_path:
            return ("skipped: hf-assisted needs --assistant-model-path (a same-tokenizer small "
                    "LM; none ships for SmolLM2-135M)")
        return None
    if name.startswith("llamacpp"):
        if importlib.util.find_spec("llama_cpp") is None:
            return ("skipped: llama-cpp-python is not installed (pip install llama-cpp-python; "
                    "PyPI has only a source build, which compiles llama.cpp)")
        if gguf_file(model_path) is None:
            return "skipped: llama.cpp needs a single .gguf file as the model"
        return None
    import torch

    if not torch.cuda.is_available():
        return "skipped: upstream SGLang's server needs a CUDA GPU"
    if importlib.util.find_spec("sglang.srt") is None:
        return "skipped: upstream SGLang srt is not installed"
    return "skipped: launching upstream SGLang is not automated; pass its --url to bench_serving"


class HFPeer:
    """transformers ``AutoModelForCausalLM`` on the same weights, one request at a time."""

    def __init__(self, model_path: str | None, dtype: str, variant: str = "hf",
                 assistant_path: str | None = None, prompt_lookup_tokens: int = 10) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {_TORCH_DTYPES}")
        self.torch_dtype = getattr(torch, dtype)
        self.variant = variant
        self.model = AutoModelForCausalLM.from_pretrained(
            str(hf_model_dir(model_path)), dtype=self.torch_dtype).eval()
        self.extra: dict[str, Any] = {}
        if variant == "hf-prompt-lookup":
            self.extra["prompt_lookup_num_tokens"] = prompt_lookup_tokens
        elif variant == "hf-assisted":
            if not assistant_path:
                raise ValueError("hf-assisted needs an assistant model path")
            self.extra["assistant_model"] = AutoModelForCausalLM.from_pretrained(
                str(hf_model_dir(assistant_path)), dtype=self.torch_dtype).eval()
        eos = self.model.generation_config.eos_token_id
        self.pad_id = (eos[0] if isinstance(eos, list) else eos) or 0

    def generate_ids(self, batch_ids: list[list[int]], max_new_tokens: int,
                     temperature: float = 0.0, ignore_eos: bool = False,
                     seed: int | None = None) -> list[list[int]]:
        """New token ids for equal-length prompts ``batch_ids`` (one ``generate`` call)."""
        import torch

        if len({len(x) for x in batch_ids}) != 1:
            raise ValueError("HFPeer.generate_ids needs prompts of equal length")
        ids = torch.tensor(batch_ids, dtype=torch.long)  # [batch, prompt_len]
        kw: dict[str, Any] = dict(self.extra)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kw.update(do_sample=False)
        if ignore_eos:
            kw["min_new_tokens"] = max_new_tokens
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                      **kw)  # [batch, prompt_len + new]
        new = out[:, ids.shape[1]:].tolist()
        eos = self.model.generation_config.eos_token_id
        eos_set = set(eos if isinstance(eos, list) else [eos])
        trimmed = []
        for row in new:
            cut = next((k + 1 for k, t in enumerate(row) if t in eos_set and not ignore_eos),
                       len(row))
            trimmed.append(row[:cut])
        return trimmed


class LlamaCppPeer:
    """llama.cpp (``llama-cpp-python``) on the GGUF, plain or with prompt-lookup drafting."""

    def __init__(self, model_path: str | None, prompt_lookup: bool = False,
                 num_threads: int | None = None, n_ctx: int = 4096,
                 prompt_lookup_tokens: int = 10) -> None:
        from llama_cpp import Llama

        path = gguf_file(model_path)
        if path is None:
            raise ValueError("llama.cpp needs a single .gguf file")
        draft = None
        if prompt_lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup_tokens)
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=num_threads,
                         draft_model=draft, verbose=False, seed=0)

    def complete(self, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> dict[str, Any]:
        """An SGLang-shaped output dict for one completion."""
        kw: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if seed is not None:
            kw["seed"] = seed
        out = self.llm.create_completion(prompt, **kw)
        usage = out.get("usage") or {}
        return {"text": out["choices"][0]["text"],
                "meta_info": {"completion_tokens": int(usage.get("completion_tokens", 0))}}


def run_peer(name: str, prompts: list[str], domains: list[str], tokenizer: Any,
             max_new_tokens: int, temperature: float, dtype: str,
             model_path: str | None = None, assistant_path: str | None = None,
             num_threads: int | None = None, seed: int = 0
             ) -> tuple[list[RequestResult], float]:
    """Run peer ``name`` over the (chat-formatted) prompts one at a time.

    ``tokenizer`` is our engine's tokenizer (same vocabulary as the peer's model); it turns text
    into the ids fed to transformers. Returns results and wall time; raises when the peer cannot
    be built (callers report it and go on).
    """
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    runner: Any
    if name.startswith("hf"):
        runner = HFPeer(model_path, dtype, name, assistant_path)
    elif name.startswith("llamacpp"):
        runner = LlamaCppPeer(model_path, name == "llamacpp-prompt-lookup", num_threads)
    else:
        raise ValueError(f"peer {name!r} cannot be run in-process")
    results: list[RequestResult] = []
    start = time.perf_counter()
    for i, (text, dom) in enumerate(zip(prompts, domains)):
        t0 = time.perf_counter()
        try:
            if isinstance(runner, HFPeer):
                ids = runner.generate_ids([tokenizer.encode(text)], max_new_tokens, temperature,
                                          seed=seed + i)[0]
                out: dict[str, Any] = {"output_ids": ids,
                                       "meta_info": {"completion_tokens": len(ids)}}
            else:
                out = runner.complete(text, max_new_tokens, temperature, seed + i)
            results.append(RequestResult.from_output(i, dom, time.perf_counter() - t0, out))
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            results.append(RequestResult(i, dom, time.perf_counter() - t0, error=error_text(e)))
    return results, time.perf_counter() - start

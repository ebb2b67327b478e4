"""Peer systems on the same weights and prompts: transformers ``generate`` and llama.cpp.

Each peer is optional. ``peer_unavailable(name)`` returns None when it can run, else a message
saying what to install; the benchmarks print that message and skip the peer. Peers run one
request at a time (concurrency 1), which is how both are normally used on a CPU.

transformers variants: ``hf`` (plain greedy/sampled ``generate``), ``hf-prompt-lookup``
(``prompt_lookup_num_tokens``), ``hf-assisted`` (``assistant_model``, a same-tokenizer small LM).
llama.cpp variants (llama.cpp through ``cyllama``, whose PyPI wheel bundles a CPU build; PyPI's
``llama-cpp-python`` is a source-only package that compiles llama.cpp for about an hour on two
cores) on the GGUF itself: ``llamacpp`` (plain decoding) and ``llamacpp-prompt-lookup``
(llama.cpp's own n-gram cache, ``common/ngram-cache``, drafting from the request's context and
verified in one batched ``llama_decode``).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from dspark_sglang.benchmark.metrics import RequestResult
from dspark_sglang.benchmark.report import error_text

PEERS = ("hf", "hf-prompt-lookup", "hf-assisted", "llamacpp", "llamacpp-prompt-lookup",
         "llamacpp-server", "llamacpp-server-dspark", "sglang")
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
                     assistant_path: str | None = None, llama_server: str | None = None
                     ) -> str | None:
    """None when peer ``name`` can run here, else why not (with the install command)."""
    if name not in PEERS:
        return f"unknown peer {name!r}; expected one of {list(PEERS)}"
    if name.startswith("llamacpp-server"):
        from dspark_sglang.benchmark.llamacpp_server import find_llama_server, supports_dspark

        binary = find_llama_server(llama_server)
        if binary is None:
            return ("skipped: no llama-server binary (build one with scripts/build_llamacpp.sh, "
                    "then pass --llama-server or set $DSPARK_LLAMA_SERVER)")
        if gguf_file(model_path) is None:
            return "skipped: llama.cpp needs a single .gguf file as the model"
        if name.endswith("dspark") and not supports_dspark(binary):
            return f"skipped: {binary} has no --spec-type draft-dspark (llama.cpp before 2026-07)"
        return None
    if name.startswith("hf"):
        if importlib.util.find_spec("transformers") is None:
            return "skipped: transformers is not installed (pip install transformers)"
        if name == "hf-assisted" and not assistant_path:
            return ("skipped: hf-assisted needs --assistant-model-path (a same-tokenizer small "
                    "LM; none exists for SmolLM2-135M; scripts/get_qwen_pair.sh fetches a "
                    "Qwen2.5-Coder 1.5B target with a 0.5B assistant)")
        return None
    if name.startswith("llamacpp"):
        if importlib.util.find_spec("cyllama") is None:
            return ("skipped: llama.cpp bindings are not installed (pip install cyllama, or "
                    "pip install -e '.[bench]')")
        if gguf_file(model_path) is None:
            return "skipped: llama.cpp needs a single .gguf file as the model"
        return None
    import torch

    if not torch.cuda.is_available():
        return "skipped: upstream SGLang's server needs a CUDA GPU"
    if importlib.util.find_spec("sglang.srt") is None:
        return "skipped: upstream SGLang srt is not installed"
    return "skipped: launching upstream SGLang is not automated; pass its --url to bench_serving"


PEER_PACKAGES = {"hf": ["transformers", "accelerate"], "llamacpp": ["cyllama"]}  # = module names


def install_peer(name: str, log: Any = print) -> bool:
    """pip-install the packages peer ``name`` needs that are missing from this interpreter;
    True when something was installed successfully."""
    import subprocess
    import sys

    pkgs = next((v for k, v in PEER_PACKAGES.items() if name.startswith(k)), [])
    pkgs = [p for p in pkgs if importlib.util.find_spec(p) is None]
    if not pkgs:
        return False
    log(f"[bench] installing {' '.join(pkgs)} for peer {name} ...")
    rc = subprocess.call([sys.executable, "-m", "pip", "install", "-q", *pkgs])
    importlib.invalidate_caches()
    return rc == 0


class HFPeer:
    """transformers ``AutoModelForCausalLM`` on the same weights, one request at a time."""

    def __init__(self, model_path: str | None, dtype: str, variant: str = "hf",
                 assistant_path: str | None = None, prompt_lookup_tokens: int = 10) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if dtype == "auto":  # as the engine resolves it (model_loader.resolve_dtype)
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
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
    """llama.cpp on the GGUF file, one request at a time, plain or with n-gram drafting.

    Greedy (``temperature == 0``) takes the argmax; sampling uses llama.cpp's temperature + dist
    sampler. With ``prompt_lookup`` each step drafts up to ``num_draft`` tokens from llama.cpp's
    n-gram cache over the request's tokens, decodes the last token and the draft in one batch
    with logits at every position, keeps the longest prefix where the sampled token equals the
    draft (lossless: with a deterministic draft, "sample, then compare" accepts token d with
    probability p(d)), and removes the rejected positions from llama.cpp's KV memory.
    """

    def __init__(self, model_path: str | None, prompt_lookup: bool = False,
                 num_threads: int | None = None, n_ctx: int = 4096, num_draft: int = 10,
                 ngram_min: int = 1, ngram_max: int = 4) -> None:
        import os

        import cyllama.llama.llama_cpp as cp

        path = gguf_file(model_path)
        if path is None:
            raise ValueError("llama.cpp needs a single .gguf file")
        cp.disable_logging()
        self.cp = cp
        mparams = cp.LlamaModelParams()
        mparams.n_gpu_layers = 0
        self.model = cp.LlamaModel(str(path), mparams)
        self.vocab = self.model.get_vocab()
        cparams = cp.LlamaContextParams()
        cparams.n_ctx = n_ctx
        cparams.n_batch = 512
        threads = num_threads or len(os.sched_getaffinity(0))
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = cp.LlamaContext(self.model, cparams)
        self.n_ctx = n_ctx
        self.prompt_lookup = prompt_lookup
        self.num_draft = num_draft
        self.ngram = (ngram_min, ngram_max)

    def _sampler(self, temperature: float, seed: int | None) -> Any:
        smp = self.cp.LlamaSampler(self.cp.LlamaSamplerChainParams())
        if temperature > 0:
            smp.add_temp(temperature)
            smp.add_dist(0 if seed is None else seed & 0xFFFFFFFF)
        else:
            smp.add_greedy()
        return smp

    def _decode(self, tokens: list[int], pos: int, all_logits: bool) -> None:
        """Append ``tokens`` at positions ``pos..``; logits at every one or only the last."""
        for off in range(0, len(tokens), 512):
            chunk = tokens[off:off + 512]
            batch = self.cp.LlamaBatch(n_tokens=len(chunk), embd=0, n_seq_max=1)
            last = off + len(chunk) == len(tokens)
            for i, t in enumerate(chunk):
                batch.add(t, pos + off + i, [0], all_logits or (last and i == len(chunk) - 1))
            self.ctx.decode(batch)

    def tokenize(self, text: str) -> list[int]:
        return list(self.vocab.tokenize(text, add_special=True, parse_special=True))

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                     ignore_eos: bool = False, seed: int | None = None
                     ) -> tuple[list[int], int]:
        """(new token ids, number of target ``llama_decode`` steps after the prompt)."""
        if len(prompt_ids) + max_new_tokens + self.num_draft >= self.n_ctx:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens "
                             f"exceeds the llama.cpp context ({self.n_ctx})")
        smp = self._sampler(temperature, seed)
        self.ctx.kv_cache_clear()
        self._decode(prompt_ids, 0, all_logits=False)
        pos = len(prompt_ids)
        out: list[int] = []
        steps = 0
        tok = smp.sample(self.ctx, -1)
        cache = self.cp.NgramCache() if self.prompt_lookup else None
        if cache is not None:
            cache.update(list(prompt_ids), ngram_min=self.ngram[0], ngram_max=self.ngram[1])
        n_cached = len(prompt_ids)

        def done(t: int) -> bool:
            return len(out) >= max_new_tokens or (not ignore_eos and self.vocab.is_eog(t))

        while True:
            out.append(tok)
            if done(tok):
                break
            draft: list[int] = []
            if cache is not None:
                hist = list(prompt_ids) + out
                cache.update(hist, ngram_min=self.ngram[0], ngram_max=self.ngram[1],
                             nnew=len(hist) - n_cached)
                n_cached = len(hist)
                k = min(self.num_draft, max_new_tokens - len(out))
                draft = list(cache.draft(hist, n_draft=k, ngram_min=self.ngram[0],
                                         ngram_max=self.ngram[1]))[:k] if k > 0 else []
            self._decode([tok, *draft], pos, all_logits=bool(draft))
            steps += 1
            n_acc = 0
            nxt = smp.sample(self.ctx, 0 if draft else -1)
            while n_acc < len(draft) and nxt == draft[n_acc]:
                out.append(nxt)
                n_acc += 1
                if done(nxt):
                    return out, steps
                nxt = smp.sample(self.ctx, n_acc)
            pos += 1 + n_acc
            if n_acc < len(draft):
                self.ctx.memory_seq_rm(0, pos, -1)
            tok = nxt
        return out, steps


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
                ids, steps = runner.generate_ids(runner.tokenize(text), max_new_tokens,
                                                 temperature, seed=seed + i)
                out = {"output_ids": ids, "meta_info": {"completion_tokens": len(ids),
                                                        "spec_verify_ct": steps}}
            results.append(RequestResult.from_output(i, dom, time.perf_counter() - t0, out))
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            results.append(RequestResult(i, dom, time.perf_counter() - t0, error=error_text(e)))
    return results, time.perf_counter() - start

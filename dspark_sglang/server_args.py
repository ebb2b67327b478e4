"""Engine / server configuration: one frozen dataclass; the CLI is generated from its fields."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

# light modules: names only, the implementations are imported when built
from dspark_sglang.constrained.registry import grammar_backend_names
from dspark_sglang.layers.attention.registry import attention_backend_names
from dspark_sglang.speculative.registry import speculative_algorithm_names


def _f(default: Any, help: str,
       choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None) -> Any:
    """A field; ``choices`` may be a registry's name function, read at validation time."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _choices(f: dataclasses.Field[Any]) -> tuple[Any, ...] | None:
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


@dataclass(frozen=True)
class ServerArgs:
    # model
    model_path: str | None = _f(None, "HF safetensors dir or GGUF file; default: embedded "
                                      "SmolLM2-135M-Instruct and its shipped drafter")
    served_model_name: str | None = _f(None, "name reported by the API (default: model_path)")
    dtype: str = _f("auto", "weights/activations dtype (auto = float32 on CPU, bfloat16 on GPU)",
                    ("auto", "float32", "bfloat16", "float16"))
    device: str = _f("auto", "cpu | cuda | auto")
    quantization: str = _f("auto", "gguf: on CPU in float32, compute decode/verify/draft matmuls "
                                   "(and the LM head) on a GGUF checkpoint's own Q4_0/Q4_1/Q8_0/"
                                   "Q4_K/Q6_K blocks (Q8 activations for the first three, as "
                                   "llama.cpp; ~2x faster decode; prefill stays float32); none: "
                                   "dequantised float32 weights; auto (default): gguf for a GGUF "
                                   "checkpoint on CPU with the cpu attention backend, else none",
                           ("auto", "none", "gguf"))
    context_length: int | None = _f(None, "max tokens per request (prompt + output)")
    # memory / scheduling
    max_total_tokens: int = _f(65536, "KV pool size in tokens (shared by target and drafter)")
    max_running_requests: int = _f(64, "max concurrently running requests")
    chunked_prefill_size: int = _f(2048, "max prefill tokens per forward (-1 = no chunking)")
    disable_radix_cache: bool = _f(False, "disable the radix prefix cache")
    attention_backend: str = _f("auto", "attention kernels (auto: cpu on a CPU with float32, "
                                        "else torch_native; cpu: C++ paged kernel for "
                                        "decode/verify, SDPA for prefill)",
                                attention_backend_names)
    disable_cuda_graph: bool = _f(False, "never capture CUDA graphs (always off on CPU)")
    num_threads: int | None = _f(None, "torch intra-op threads on CPU (default: torch's)")
    tp_size: int = _f(1, "tensor-parallel ranks (one process each; NCCL on CUDA, gloo on CPU)")
    random_seed: int = _f(0, "seed for requests without their own seed")
    # speculative decoding (SGLang spelling)
    speculative_algorithm: str = _f("NONE", "speculative decoding algorithm",
                                    speculative_algorithm_names)
    speculative_draft_model_path: str | None = _f(None, "drafter checkpoint (DeepSpec layout for "
                                                        "DSPARK, an LM for STANDALONE)")
    speculative_draft_model_quantization: str | None = _f(
        None, "DSPARK drafter weights next to a GGUF-block target: q8_0 (default), q4_0 or "
              "q4_1 (GGUF blocks quantised at load from its float weights; fewer bytes a "
              "draft), none (float32)", (None, "q8_0", "q4_0", "q4_1", "none"))
    speculative_num_draft_tokens: int | None = _f(None, "fixed draft length per step (CHAIN, "
                                                        "NGRAM, STANDALONE; tree node budget); "
                                                        "DSPARK: verify window gamma + 1, as "
                                                        "upstream (caps gamma at the block)")
    speculative_eagle_topk: int = _f(4, "TREE: branching factor per position")
    speculative_dspark_block_size: int | None = _f(None, "DSPARK block size (default: drafter's)")
    speculative_dspark_sps_table_path: str | None = _f(None, "SPS(B) table json; profiled and "
                                                             "cached at start when absent")
    speculative_dspark_confidence_sts_path: str | None = _f(None, "STS calibration json")
    speculative_token_map: str | None = _f(None, "draft only over these token ids (.json / .pt, "
                                                 "ranked; FR-Spec): default the drafter's "
                                                 "token_map.json when it ships one, 'none' = "
                                                 "the full vocabulary")
    speculative_token_map_size: int | None = _f(None, "use the first N ids of the token map "
                                                      "(default: all of them)")
    speculative_dspark_disable_draft_budget: bool = _f(
        False, "draft every step instead of skipping drafts that past acceptance and the "
               "measured draft cost say will not pay (the budget depends on timing, so seeded "
               "sampling is reproducible run to run only with it disabled)")
    speculative_ngram_max_match: int = _f(4, "NGRAM: longest suffix n-gram to look up")
    # structured generation
    grammar_backend: str = _f("llguidance", "grammar backend (llguidance compiles in ~1 ms; see "
                                            "constrained/registry.py)",
                              grammar_backend_names)
    # server
    host: str = _f("127.0.0.1", "bind address")
    port: int = _f(30000, "port")
    api_key: str | None = _f(None, "require 'Authorization: Bearer <key>' on every endpoint")
    log_level: str = _f("info", "log level", ("debug", "info", "warning", "error"))
    enable_metrics: bool = _f(True, "serve Prometheus /metrics (--no-enable-metrics: off)")
    # overload protection
    max_queued_requests: int | None = _f(None, "requests allowed to wait beyond "
                                               "max_running_requests; past it the server answers "
                                               "429 with Retry-After (default: no limit)")
    request_timeout: float | None = _f(None, "seconds a request may take from arrival to its "
                                             "last token; then it is aborted (HTTP 408)")
    max_request_body_bytes: int = _f(32 << 20, "largest HTTP request body accepted (413 above)")
    disable_prefill_decode_interleave: bool = _f(
        False, "run prefill chunks back to back before decoding again (default: one decode "
               "step after each prefill chunk, which bounds the inter-token latency of running "
               "streams while a long prompt prefills)")
    incremental_streaming_output: bool = _f(
        False, "native /generate streams send text and output_ids as deltas (SGLang's flag; "
        "logprob lists are deltas either way)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = _choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, "
                                 f"got {getattr(self, f.name)!r}")
        if self.max_total_tokens < 16:
            raise ValueError(f"max_total_tokens must be >= 16, got {self.max_total_tokens}")
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError("chunked_prefill_size must be -1 or positive")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("context_length must be >= 2")
        n = self.speculative_num_draft_tokens
        if n is not None and not 1 <= n <= 64:
            raise ValueError("speculative_num_draft_tokens must be in [1, 64]")
        if n is not None and n < 2 and self.speculative_algorithm == "DSPARK":
            raise ValueError("for DSPARK speculative_num_draft_tokens is gamma + 1 (>= 2)")
        b = self.speculative_dspark_block_size
        if b is not None and not 1 <= b <= 32:
            raise ValueError("speculative_dspark_block_size must be in [1, 32]")
        if self.speculative_algorithm == "STANDALONE" and not self.speculative_draft_model_path:
            raise ValueError("speculative_algorithm STANDALONE needs speculative_draft_model_path")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError("request_timeout must be > 0")
        if self.max_request_body_bytes < 1024:
            raise ValueError("max_request_body_bytes must be >= 1024")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    def replace(self, **kw: Any) -> ServerArgs:
        return dataclasses.replace(self, **kw)

    # ---- CLI -----------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                # a flag that defaults to on can be switched off: --no-enable-metrics
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                parser.add_argument(flag, action=action, default=f.default, help=help_)
                continue
            base = _base_type(f.type)
            choices = _choices(f)  # (None, the default of an optional choice, is not typed)
            parser.add_argument(flag, type=base, default=f.default, help=help_,
                                choices=None if choices is None
                                else [c for c in choices if c is not None])

    @staticmethod
    def from_cli_args(args: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(ServerArgs)}
        return ServerArgs(**{k: v for k, v in vars(args).items() if k in names})


def _base_type(t: Any) -> type:
    s = str(t)
    if s.startswith("int"):
        return int
    if s.startswith("float"):
        return float
    for a in get_args(t):
        if a is not type(None):
            return a
    return str


def server_cli_args(args: ServerArgs) -> list[str]:
    """ServerArgs -> the launch_server command line (only fields that differ from defaults)."""
    out: list[str] = []
    for f in dataclasses.fields(ServerArgs):
        value = getattr(args, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                out.append(flag)
            continue
        out += [flag, str(value)]
    return out


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m dspark_sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))

"""dspark_sglang: an SGLang-compatible serving runtime with DSpark speculative decoding."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "Runtime", "ServerArgs", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import dspark_sglang` stays light
    if name == "Engine":
        from dspark_sglang.entrypoints.engine import Engine

        return Engine
    if name == "Runtime":
        from dspark_sglang.entrypoints.runtime import Runtime

        return Runtime
    if name == "ServerArgs":
        from dspark_sglang.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)

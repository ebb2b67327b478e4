"""``python -m dspark_sglang.launch_server --model-path ... --port ...`` (SGLang's spelling).

Without ``--model-path`` the embedded default model (SmolLM2-135M-Instruct) is served.
"""

from __future__ import annotations

import sys

from dspark_sglang.server_args import parse_args


def main(argv: list[str] | None = None) -> None:
    from dspark_sglang.entrypoints.http_server import launch_server

    launch_server(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()

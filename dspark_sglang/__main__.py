"""``python -m dspark_sglang ...`` is ``python -m dspark_sglang.launch_server ...``."""

from __future__ import annotations

from dspark_sglang.launch_server import main

if __name__ == "__main__":
    main()

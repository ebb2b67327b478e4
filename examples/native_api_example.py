"""SGLang's native /generate with plain ``requests`` (start a server first:
``python -m dspark_sglang.launch_server --port 30000``).

    python examples/native_api_example.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json

import requests

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:30000")
    url = p.parse_args().url
    body = {"text": "List three colors:", "sampling_params": {"max_new_tokens": 24,
                                                              "temperature": 0},
            "return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    out = requests.post(url + "/generate", json=body, timeout=120).json()
    print(out["text"])
    print("first token logprobs:", out["meta_info"]["output_token_logprobs"][:1])
    with requests.post(url + "/generate", json={**body, "stream": True}, stream=True) as r:
        for line in r.iter_lines():
            if line and line != b"data: [DONE]":
                print("stream:", json.loads(line[5:])["text"])

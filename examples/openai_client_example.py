"""The ``openai`` client against the OpenAI-compatible API (server on --url), streaming chat.

    python examples/openai_client_example.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import openai

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--api-key", default="none")
    a = p.parse_args()
    client = openai.OpenAI(base_url=a.url + "/v1", api_key=a.api_key)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello in French."}],
        max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print("\nusage:", chunk.usage)

"""A JSON-schema-constrained chat completion: the reply always parses and validates.

    python examples/json_schema_example.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json

import openai

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                         "population_millions": {"type": "number"}},
          "required": ["city", "country", "population_millions"],
          "additionalProperties": False}

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:30000")
    client = openai.OpenAI(base_url=p.parse_args().url + "/v1", api_key="none")
    r = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        max_tokens=96, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city",
                                                                "schema": SCHEMA}})
    print(json.loads(r.choices[0].message.content))

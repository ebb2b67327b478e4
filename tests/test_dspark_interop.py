"""DSpark interop: published config layouts load, and upstream SGLang's own parsers read ours."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dspark_sglang.speculative.dspark.config import (
    DSparkConfig,
    dspark_num_draft_from_num_draft_tokens,
)

sys.path.insert(0, str(Path(__file__).parent))
from upstream_sglang import load_upstream_parsers  # noqa: E402

V, H = 100, 32


def make_config(**kw: Any) -> DSparkConfig:
    base: dict[str, Any] = {
        "vocab_size": V, "hidden_size": H, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "block_size": 5,
        "target_layer_ids": (0, 2), "mask_token_id": V - 1, "markov_rank": 8,
        "markov_head_type": "gated", "enable_confidence_head": True,
        "confidence_head_with_markov": True, "rope_theta": 10000.0, "num_target_layers": 4}
    base.update(kw)
    return DSparkConfig(**base)


@pytest.fixture(scope="module")
def upstream() -> Any:
    return load_upstream_parsers()


# ---- loading published layouts ------------------------------------------------------------


def test_rope_base_from_transformers5_rope_parameters() -> None:
    d = make_config().to_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert DSparkConfig.from_dict(d).rope_theta == 10000.0
    d["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert DSparkConfig.from_dict(d).rope_theta == 5e5
    del d["rope_parameters"]  # nothing at all: transformers' default, not 1e6
    assert DSparkConfig.from_dict(d).rope_theta == 10000.0
    d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}
    cfg = DSparkConfig.from_dict(d)
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_parameters()["factor"] == 8.0


def test_written_rope_reads_back_in_transformers_and_upstream(upstream: Any) -> None:
    from transformers import Qwen3Config

    d = make_config(rope_theta=123456.0).to_dict()
    hf = Qwen3Config.from_dict(d)
    assert hf.rope_parameters["rope_theta"] == 123456.0
    theta, _ = upstream.get_rope_config(hf)
    assert theta == 123456.0
    assert DSparkConfig.from_dict(hf.to_dict()).rope_theta == 123456.0


def test_nested_dflash_and_dspark_config(upstream: Any) -> None:
    d = make_config().to_dict()
    for k in ("block_size", "target_layer_ids", "mask_token_id", "markov_rank",
              "markov_head_type"):
        d.pop(k)
    d["dflash_config"] = {"block_size": 6, "target_layer_ids": [1, 3], "mask_token_id": 7}
    d["dspark_config"] = {"markov_rank": 4, "markov_head_type": "RNN", "mask_token_id": 9}
    cfg = DSparkConfig.from_dict(d)
    assert (cfg.block_size, cfg.target_layer_ids, cfg.mask_token_id) == (6, (1, 3), 9)
    assert (cfg.markov_rank, cfg.markov_head_type) == (4, "rnn")
    up = upstream.parse_dspark_draft_config(draft_hf_config=d)
    assert (up.gamma, up.target_layer_ids, up.mask_token_id) == (6, [1, 3], 9)
    assert (up.markov_rank, up.markov_head_type) == (4, "rnn")
    # nested keys win over stale top-level ones, as upstream
    d["block_size"] = 99
    assert DSparkConfig.from_dict(d).block_size == 6
    # text_config wrapper
    assert DSparkConfig.from_dict({"text_config": d}).block_size == 6


def test_bundled_target_config_is_refused_with_a_clear_error() -> None:
    target = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
              "hidden_size": 4096, "dspark_block_size": 5, "dspark_markov_rank": 256,
              "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [40, 41, 42]}
    with pytest.raises(ValueError, match=r"bundles a DSpark drafter.*mtp\.N"):
        DSparkConfig.from_dict(target)


@pytest.mark.parametrize(("change", "message"), [
    ({"markov_head_type": None}, "markov_head_type is required"),
    ({"sample_from_anchor": False}, "sample_from_anchor"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "full_attention"),
    ({"layer_types": ["full_attention"]}, "entries"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "silu"),
    ({"architectures": ["DeepseekV4DSparkModel"]}, "unsupported DSpark drafter architecture"),
])
def test_unsupported_fields_raise(change: dict[str, Any], message: str) -> None:
    d = make_config().to_dict()
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(ValueError, match=message):
        DSparkConfig.from_dict(d)


def test_defaults_follow_upstream(upstream: Any) -> None:
    d = make_config().to_dict()
    d.pop("confidence_head_with_markov")
    assert DSparkConfig.from_dict(d).confidence_head_with_markov is True
    d.pop("enable_confidence_head")  # upstream SGLang builds the head when the key is absent
    cfg = DSparkConfig.from_dict(d)
    assert cfg.enable_confidence_head and cfg.confidence_head_with_markov
    for arch in ("Qwen3DSparkModel", "LingDSparkModel", "DSparkDraftModel"):
        d["architectures"] = [arch]
        assert DSparkConfig.from_dict(d).qk_norm is True
    assert upstream.get_dspark_sample_from_anchor(make_config().to_dict()) is True
    # upstream refuses the same missing head type we refuse
    bad = make_config().to_dict()
    bad.pop("markov_head_type")
    with pytest.raises(ValueError, match="markov_head_type"):
        upstream.parse_dspark_draft_config(draft_hf_config=bad)


def test_shipped_drafter_config_parses_in_both() -> None:
    root = Path(__file__).resolve().parent.parent
    d = json.loads((root / "dspark_sglang/assets/drafters/smollm2_135m/config.json").read_text())
    cfg = DSparkConfig.from_dict(d)
    assert cfg.rope_theta == d["rope_theta"]
    up = load_upstream_parsers().parse_dspark_draft_config(draft_hf_config=d)
    assert up.gamma == cfg.block_size and up.markov_rank == cfg.markov_rank


# ---- --speculative-num-draft-tokens --------------------------------------------------------


def test_num_draft_tokens_means_gamma_plus_one_like_upstream(upstream: Any) -> None:
    d = make_config(block_size=7).to_dict()
    for n in (2, 4, 8):
        ours = dspark_num_draft_from_num_draft_tokens(n, 7)
        up = upstream.resolve_runtime_config(draft_hf_config=d, speculative_num_draft_tokens=n,
                                             target_vocab_size=V)
        assert ours == up.gamma == n - 1 and up.verify_num_draft_tokens == n
    assert dspark_num_draft_from_num_draft_tokens(None, 7) == 7
    assert dspark_num_draft_from_num_draft_tokens(20, 7) == 7  # capped at the trained block
    with pytest.raises(ValueError, match="gamma \\+ 1"):
        dspark_num_draft_from_num_draft_tokens(1, 7)
    up = upstream.resolve_runtime_config(draft_hf_config=d, speculative_num_draft_tokens=None,
                                         target_vocab_size=V)
    assert up.gamma == 7


def test_server_args_reject_dspark_window_below_two() -> None:
    from dspark_sglang.server_args import ServerArgs

    with pytest.raises(ValueError, match="gamma \\+ 1"):
        ServerArgs(speculative_algorithm="DSPARK", speculative_num_draft_tokens=1)
    assert ServerArgs(speculative_algorithm="CHAIN", speculative_num_draft_tokens=1)


def test_engine_dspark_draft_length_from_num_draft_tokens(
        llama_dir: str, drafter_dir: str, make_engine: Any, tmp_path: Path) -> None:
    from dspark_sglang.speculative.sps_profile import SPSTable

    sps = tmp_path / "sps.json"
    SPSTable.from_measurements({1: 100.0, 8: 90.0, 64: 20.0}).save(sps)
    eng = make_engine(llama_dir, speculative_algorithm="DSPARK",
                      speculative_draft_model_path=drafter_dir,
                      speculative_dspark_sps_table_path=str(sps),
                      speculative_num_draft_tokens=3)
    worker = eng.parts.decoder.worker
    assert worker.gamma == 4 and worker.policy.num_draft == 2




# ---- SPS tables and STS files in upstream's formats ----------------------------------------


def test_sps_table_round_trips_through_upstream_decoder(tmp_path: Path) -> None:
    from sglang.srt.speculative.dspark_components import dspark_sps as up

    from dspark_sglang.speculative.sps_profile import SPSTable

    ours = SPSTable.from_measurements({1: 50.0, 4: 48.0, 16: 30.0, 64: 9.0})
    path = tmp_path / "sps.json"
    ours.save(path)
    table = up.load_sps_table_from_path(str(path))
    assert isinstance(table, up.SpsCostTable)
    assert table.sample_batch_tokens == [1, 4, 16, 64] and table.max_batch_tokens == 64
    assert table.lookup(16) == pytest.approx(ours.sps(16))
    # upstream-written table -> ours
    probes = [(1, 40.0), (8, 35.0), (32, 12.0)]
    upstream_json = up.profile_sps_table(probes=probes, max_batch_tokens=128).to_json()
    path.write_text(upstream_json)
    back = SPSTable.load(path)
    assert back.token_counts == [1, 8, 32] and back.sps(8) == pytest.approx(35.0)
    assert back.to_json()["max_batch_tokens"] == 128
    # our earlier format still reads
    path.write_text(json.dumps({"token_counts": [1, 2], "sps": [9.0, 8.0], "meta": {}}))
    assert SPSTable.load(path).sps(2) == pytest.approx(8.0)


def test_additive_sps_table_reads_and_writes_back(tmp_path: Path) -> None:
    from sglang.srt.speculative.dspark_components import dspark_sps as up

    from dspark_sglang.speculative.sps_profile import SPSTable

    add = up.SpsAdditiveCostTable(bias_seconds=0.01, bs_probes=[1, 8], alpha_seconds=[0.0, 0.004],
                                  m_probes=[1, 64], theta_seconds=[0.0, 0.03])
    path = tmp_path / "add.json"
    path.write_text(add.to_json())
    ours = SPSTable.load(path)
    for b in (1, 8, 64):
        expected = 1.0 / add.step_time(num_reqs=-(-b // 8), budget=b - (-(-b // 8)))
        assert ours.sps(b) == pytest.approx(expected, rel=1e-9)
    ours.save(path)
    again = up.load_sps_table_from_path(str(path))
    assert isinstance(again, up.SpsAdditiveCostTable) and again == add


def test_sts_file_never_contains_nan_and_upstream_reads_it(tmp_path: Path) -> None:
    from sglang.srt.speculative.dspark_components.dspark_sts import load_sts_calibration_from_path

    from dspark_sglang.speculative.dspark.confidence import StsCalibration

    cal = StsCalibration(temperatures=[1.0, 1.5, 0.5], dataset="d", num_samples=3,
                         ece_before=[0.1, float("nan"), 0.2], ece_after=[0.05, 0.01, 0.02])
    path = tmp_path / "sts.json"
    cal.save(path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    up = load_sts_calibration_from_path(str(path))
    assert up.temperatures == [1.0, 1.5, 0.5] and up.ece_after == [0.05, 0.01, 0.02]
    assert up.ece_before == []  # the list with a gap is omitted, not written with NaN
    path.write_text(up.to_json())  # upstream-written file reads back here
    assert StsCalibration.load(path).temperatures == [1.0, 1.5, 0.5]
    with pytest.raises(ValueError):
        StsCalibration(temperatures=[float("inf")])


# ---- exports: DeepSpec / upstream SGLang directory, llama.cpp GGUF ---------------------------


def make_drafter(**kw: Any) -> Any:
    from dspark_sglang.speculative.dspark.model import DSparkDrafter

    torch.manual_seed(0)
    drafter = DSparkDrafter(make_config(**kw), torch.nn.Embedding(V, H),
                            torch.nn.Linear(H, V, bias=False))
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0.0, 0.2)
    return drafter.eval()


# what upstream SGLang's DSparkDraftModel.load_weights accepts (read from its code): q/k/v and
# gate/up are fused into qkv_proj / gate_up_proj by name, embed_tokens / lm_head are skipped
_UPSTREAM_LAYER_SUFFIXES = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight"}


def test_export_directory_loads_in_deepspec_and_upstream_layout(tmp_path: Path) -> None:
    from transformers import Qwen3Config

    from dspark_sglang.speculative.dspark.checkpoint import (
        load_dspark_checkpoint,
        read_checkpoint_tensor_names,
    )
    from dspark_sglang.training.export import export_drafter

    drafter = make_drafter(markov_head_type="vanilla")
    out = export_drafter(drafter, tmp_path / "d", include_shared_weights=True,
                         strict_upstream=True)
    d = json.loads((out / "config.json").read_text())
    assert d["dtype"] == "bfloat16" and d["sample_from_anchor"] is True
    # DeepSpec's Qwen3DSparkModel asserts these fields (modeling.py, read from its code)
    for key in ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head",
                "markov_rank", "markov_head_type", "confidence_head_with_markov"):
        assert key in d
    hf = Qwen3Config.from_dict(d)  # what DeepSpec and upstream get_config build
    assert str(hf.dtype) == "torch.bfloat16" and hf.rope_parameters["rope_theta"] == 10000.0
    up = load_upstream_parsers().parse_dspark_draft_config(draft_hf_config=hf)
    assert (up.gamma, up.mask_token_id, up.markov_rank) == (5, V - 1, 8)
    names = read_checkpoint_tensor_names(out)
    assert {"embed_tokens.weight", "lm_head.weight"} <= set(names)
    for n in names:
        if n.startswith("layers."):
            assert n.split(".", 2)[2] in _UPSTREAM_LAYER_SUFFIXES, n
        else:
            assert n.split(".")[0] in {"fc", "hidden_norm", "norm", "markov_head",
                                       "confidence_head", "embed_tokens", "lm_head"}, n
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in f.keys())  # noqa: SIM118
    back = load_dspark_checkpoint(out, drafter.embed_tokens, drafter.lm_head)
    w0 = drafter.state_dict()["fc.weight"]
    assert torch.allclose(back.state_dict()["fc.weight"].float(), w0, atol=1e-2)


@pytest.mark.parametrize(("change", "message"), [
    ({"markov_rank": 0, "confidence_head_with_markov": False}, "Markov head"),
    ({"enable_confidence_head": False, "confidence_head_with_markov": False},
     "confidence head"),
    ({"target_layer_ids": (-1, 2)}, "-1"),
    ({"qk_norm": False}, "q_norm"),
])
def test_export_refuses_what_upstream_rejects(change: dict[str, Any], message: str,
                                              tmp_path: Path) -> None:
    from dspark_sglang.training.export import export_drafter

    with pytest.raises(ValueError, match=message):
        export_drafter(make_drafter(**change), tmp_path / "x", strict_upstream=True)
    assert export_drafter(make_drafter(**change), tmp_path / "y").is_dir()  # lenient: warns


def _tiny_target_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_token_types([1] * V)
    w.add_bos_token_id(1)
    w.add_tensor("token_embd.weight", np.zeros((V, H), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_export_reads_back_with_llamacpp_names_and_keys(tmp_path: Path) -> None:
    from gguf import GGUFReader

    from dspark_sglang.training.export_gguf import export_gguf

    drafter = make_drafter(markov_head_type="vanilla", target_layer_ids=(1, 2))
    target = _tiny_target_gguf(tmp_path / "target.gguf")
    path = export_gguf(drafter, tmp_path / "draft.gguf", target_gguf=target)
    r = GGUFReader(str(path))

    def kv(name: str) -> Any:
        return r.fields[name].contents()

    # keys and values as llama.cpp's converter writes them (vendored in llama-cpp-python 0.3.36)
    assert kv("general.architecture") == "dflash"
    assert kv("dflash.target_layers") == [2, 3]  # HF hidden_states index: our id + 1
    assert kv("dflash.block_size") == 5 and kv("tokenizer.ggml.mask_token_id") == V - 1
    assert kv("dflash.sample_from_anchor") is True and kv("dflash.has_confidence_head") is True
    assert kv("dflash.block_count") == 2 and kv("dflash.attention.head_count_kv") == 2
    assert kv("dflash.rope.freq_base") == 10000.0 and kv("dflash.attention.key_length") == 8
    assert kv("tokenizer.ggml.model") == "gpt2" and len(kv("tokenizer.ggml.tokens")) == V
    tensors = {t.name: t for t in r.tensors}
    r_ = 8
    expected_shapes = {  # GGML ne order (torch shape reversed), as llama.cpp's loader asks
        "markov_w1.weight": [r_, V], "markov_w2.weight": [r_, V],
        "conf_proj.weight": [H + r_, 1], "conf_proj.bias": [1],
        "fc.weight": [2 * H, H], "enc.output_norm.weight": [H], "output_norm.weight": [H],
        "blk.1.attn_q.weight": [H, 4 * 8], "blk.1.attn_k_norm.weight": [8],
        "blk.0.ffn_gate.weight": [H, 64], "blk.0.ffn_norm.weight": [H],
    }
    for name, shape in expected_shapes.items():
        assert [int(x) for x in tensors[name].shape] == shape, name
    assert not any(n.startswith(("token_embd", "output.")) for n in tensors)
    assert len(tensors) == len(drafter.state_dict())
    w1 = drafter.state_dict()["markov_head.markov_w1.weight"].numpy()
    got = np.asarray(tensors["markov_w1.weight"].data, dtype=np.float32).reshape(w1.shape)
    assert np.allclose(got, w1, atol=1e-3)
    assert tensors["output_norm.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize(("change", "message"), [
    ({"markov_head_type": "gated"}, "vanilla"),
    ({"qk_norm": False}, "q_norm"),
    ({"confidence_head_with_markov": False}, "confidence head"),
    ({"target_hidden_size": 2 * H}, "target_hidden_size"),
    ({"target_layer_ids": (1, 3)}, "last target layer"),  # 4 target layers: 3 is the last
])
def test_gguf_export_refuses_what_llamacpp_cannot_run(change: dict[str, Any], message: str,
                                                      tmp_path: Path) -> None:
    from dspark_sglang.training.export_gguf import export_gguf

    kw = {"markov_head_type": "vanilla", **change}
    with pytest.raises(ValueError, match=message):
        export_gguf(make_drafter(**kw), tmp_path / "x.gguf", _tiny_target_gguf(tmp_path / "t"))


def test_default_target_layer_ids_follow_upstream_rule() -> None:
    from dspark_sglang.speculative.dspark.config import default_target_layer_ids
    from dspark_sglang.training.export_gguf import gguf_export_problems

    assert default_target_layer_ids(36) == [1, 9, 17, 25, 33]  # DeepSpec's Qwen3-8B config
    assert default_target_layer_ids(30) == [1, 8, 14, 20, 27]  # SmolLM2-135M
    assert default_target_layer_ids(30, 1) == [15]
    for n in range(8, 64):  # never the last layer, so llama.cpp can always read them
        ids = default_target_layer_ids(n)
        assert ids == sorted(ids) and max(ids) <= n - 3
        assert not gguf_export_problems(make_config(
            markov_head_type="vanilla", target_layer_ids=tuple(ids), num_target_layers=n))

"""The cached SPS table is spot-checked against the live engine at start (a table profiled
while another process loaded the machine is re-profiled, not kept)."""

from __future__ import annotations

from typing import Any


def test_cached_sps_table_is_spot_checked(llama_dir: str, drafter_dir: str, make_engine: Any,
                                          tmp_path: Any, monkeypatch: Any) -> None:
    from dspark_sglang.speculative import sps_runtime
    from dspark_sglang.speculative.sps_profile import SPSTable

    eng = make_engine(llama_dir, speculative_algorithm="DSPARK",
                      speculative_draft_model_path=drafter_dir)
    runner, cache = eng.parts.runner, eng.parts.cache
    measured = sps_runtime.measure_sps(runner, cache, (1, 8), repeats=2)
    base = measured.sps(1)
    counts = list(sps_runtime.DEFAULT_TOKEN_COUNTS)
    # a table 50x too slow everywhere (profiled under load) or 50x too fast fails the check
    slow = SPSTable(counts, [base / 50] * len(counts))
    fast = SPSTable(counts, [base * 50] * len(counts))
    assert not sps_runtime.cached_table_holds(slow, runner, cache)
    assert not sps_runtime.cached_table_holds(fast, runner, cache)
    # one measured moments ago holds (the factor is 2: above this machine's drift between two
    # spot checks, though a shared host's speed has swung ~2x within minutes: a table measured
    # again right before the check holds in at least one of three tries)
    def holds_when_fresh() -> bool:
        m = sps_runtime.measure_sps(runner, cache, (1, 8), repeats=2)
        good = SPSTable(counts, [m.sps(1)] + [m.sps(8)] * (len(counts) - 1))
        return sps_runtime.cached_table_holds(good, runner, cache)

    assert any(holds_when_fresh() for _ in range(3))

    # through load_or_profile_sps: a bogus cached file is replaced by a fresh profile
    calls = {"n": 0}
    real = sps_runtime.measure_sps

    def counting(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(sps_runtime, "measure_sps", counting)
    path = tmp_path / "sps" / "table.json"
    monkeypatch.setattr(sps_runtime, "_sps_cache_path", lambda *a: path)
    path.parent.mkdir(parents=True, exist_ok=True)
    slow.save(path)
    table = sps_runtime.load_or_profile_sps(None, "m", runner, cache)
    assert calls["n"] == 2  # the spot check, then the full profile
    assert table.sps(1) > 10 * slow.sps(1)
    assert SPSTable.load(path).sps(1) > 10 * slow.sps(1)  # the file was rewritten
    calls["n"] = 0
    again = sps_runtime.load_or_profile_sps(None, "m", runner, cache)
    assert calls["n"] in (1, 2) and again.sps(1) > 10 * slow.sps(1)

"""Smoke test of benchmarks/bench_model.py (whole-model decode step) on the tiny configuration, CPU."""

import importlib.util
import json
import os
import sys

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_model.py")


@pytest.fixture(scope="module")
def bm():
    spec = importlib.util.spec_from_file_location("bench_model", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_model", None)


def _rel(bm, bits):
    args = bm.parse_args(["--tiny", "--device", "cpu", "--context", "200", "--k-bits", str(bits), "--v-bits",
                          str(bits), "--group", "64"])
    return bm.compare_logits(bm.TINY, args, device="cpu", dtype=torch.float32, batch=2)


def test_variants_logits_agree_at_8_bits(bm):
    r8 = _rel(bm, 8)
    fp, kvc = r8["logits"]["fp"], r8["logits"]["kvc"]
    assert fp.shape == kvc.shape == (2, bm.TINY.vocab)
    assert torch.isfinite(fp).all() and torch.isfinite(kvc).all()
    assert r8["rel_err"] < 2e-3, r8["rel_err"]
    # the packed cache is really what attention reads: 2-bit codes move the logits much more than 8-bit
    r2 = _rel(bm, 2)
    assert r2["rel_err"] > 5 * r8["rel_err"], (r2["rel_err"], r8["rel_err"])


def test_tiny_run_writes_report(bm, tmp_path):
    res = bm.main(["--tiny", "--device", "cpu", "--context", "160", "--batch", "1", "--steps", "1", "--warmup", "1",
                   "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"fp", "kvc"}
    for r in rows.values():
        assert r["mode"] == "eager" and r["logits_finite"] and r["step_ms"] > 0 and r["kv_bytes"] > 0
    # 2-bit packed storage (plus its 132 full-precision tokens) is smaller than the bf16 cache
    assert rows["kvc"]["kv_bytes"] < rows["fp"]["kv_bytes"]
    data = json.loads((tmp_path / "bench_model.json").read_text())
    assert len(data["rows"]) == 2
    assert (tmp_path / "bench_model.md").read_text().count("| kvc |") == 1

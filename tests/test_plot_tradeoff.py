"""benchmarks/plot_tradeoff.py joins the measured quality and attention result files by layout."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot_tradeoff as pt  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def test_every_layout_joins_its_measured_rows():
    rows = {r["layout"]: r for r in pt.collect(RESULTS)}
    assert len(rows) == len(pt.LAYOUTS)
    for r in rows.values():
        assert r["speedup"] == pytest.approx(r["sdpa_us"] / r["fused_us"]) and r["speedup"] > 0
        assert r["ppl_fp"] == pytest.approx(23.491, abs=1e-3)  # every quality file's own full-precision row
    # the README's rows
    assert rows["pertoken (K4V2, 4 sink + 128 recent)"]["ppl_delta"] == pytest.approx(2.30, abs=0.01)
    assert rows["pertoken (K4V2, 4 sink + 128 recent)"]["speedup"] == pytest.approx(4.11, abs=0.01)
    assert rows["skvq (defaults)"]["speedup"] < 1


def test_a_missing_row_names_what_the_file_has(tmp_path):
    src = json.load(open(os.path.join(RESULTS, "quality_v37_pertoken.json")))
    src["results"] = [r for r in src["results"] if r["label"] != "pertoken"]
    (tmp_path / "q.json").write_text(json.dumps(src))
    with pytest.raises(KeyError, match="no quality row 'pertoken'.*full precision"):
        pt._quality(str(tmp_path / "q.json"), "pertoken")


def test_writes_table_and_plot(tmp_path):
    assert pt.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "tradeoff.md").read_text()
    assert text.count("\n| ") == len(pt.LAYOUTS) + 1  # the header and one row per layout
    if pt.pyplot() is not None:
        assert (tmp_path / "tradeoff.png").stat().st_size > 0

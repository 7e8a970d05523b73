"""benchmarks/bench_ceilings.py's load-only kernel against its PyTorch checksum (CPU: the Triton interpreter)."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_ceilings as bc  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 3), W=st.sampled_from([8, 16]), splits=st.integers(1, 2), tiles=st.integers(1, 3),
       meta=st.sampled_from([0, 1, 2]), seed=st.integers(0, 2**16))
def test_load_only_checksum_matches_reference(rows, W, splits, tiles, meta, seed):
    cap = 64 * tiles * splits
    gen = torch.Generator().manual_seed(seed)

    def ints(*shape):
        return torch.randint(-(1 << 31), (1 << 31) - 1, shape, dtype=torch.int32, generator=gen).to(DEVICE)

    bufs = [ints(rows * cap, W), ints(rows * cap, W)]
    ms = [ints(rows * cap * 2) for _ in range(4)]
    bufs += [m.view(torch.int16)[: rows * cap] for m in ms] if meta == 1 else [m[: rows * cap] for m in ms]
    out = torch.empty(rows * splits, dtype=torch.int32, device=DEVICE)
    got = bc.load_only(bufs, out, cap, splits, meta, 1)
    assert torch.equal(got.cpu(), bc.load_only_reference([b.cpu() for b in bufs], cap, splits, meta))


def test_load_only_says_what_splits_must_be():
    bufs = [torch.zeros(100, 8, dtype=torch.int32)] * 2 + [torch.zeros(100, dtype=torch.int32)] * 4
    with pytest.raises(ValueError, match="multiple of 64"):
        bc.load_only(bufs, torch.empty(2, dtype=torch.int32), 100, 2, 0, 1)

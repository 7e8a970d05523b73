"""The Gluon decode kernel (kvcompile.kernels.gluon_decode) through decode_attention(gluon=True).

Gluon kernels do not run under the Triton interpreter. On CPU these tests compile the kernel for sm_90 with the
installed Triton (no GPU needed: Triton ships ptxas) and check what the design relies on (no shared memory, no
spills), and check the launcher's errors; with CUDA they compare the kernel with the float32 reference on inputs
drawn by hypothesis.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvcompile.kernels.decode_attention as da
import kvcompile.kernels.gluon_decode as gd
import kvcompile.kernels.launch as launch
from kvcompile.kernels.reference import decode_attention_reference

try:  # tests/ has no __init__.py: pytest's default import mode puts tests/ itself on sys.path
    from kernel_inputs import TOL, make_inputs
except ImportError:
    from tests.kernel_inputs import TOL, make_inputs

ON_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="Gluon kernels run on CUDA only")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(not gd.HAVE_GLUON, reason="this Triton has no Gluon")]


def inputs(*, B=2, Hkv=2, r=4, bits=2, n_quant=300, S=0, n_window=0, win_extra=0, lens=None, lens_form="B3",
           q_noncontig=False, seed=0, device=None, dtype=torch.float16, v_bits=None):
    cap_extra = 4 if (max([n_quant] + [ls[1] for ls in lens or []]) % 2 == 0) else 3  # an even capacity
    kw = make_inputs(B=B, Hkv=Hkv, r=r, NQ=1, D=128, S=S, n_quant=n_quant, n_window=n_window, k_bits=bits,
                     v_bits=v_bits or bits, k_group=128, v_group=128, dtype=dtype, cap_extra=cap_extra,
                     win_extra=win_extra, lens=lens, lens_form=lens_form, q_noncontig=q_noncontig, seed=seed,
                     **({} if device is None else {"device": device}))
    assert kw["k_codes"].shape[2] % 2 == 0
    return kw


def check(kw, form=True, **tuning):
    out, lse = da.decode_attention(**kw, gluon=form, **tuning)
    ref_out, ref_lse = decode_attention_reference(**kw)
    assert out.shape == kw["q"].shape and out.dtype == kw["q"].dtype
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    out = out.float()
    assert torch.isfinite(out).all() and (out[~seen] == 0).all()
    rel = ((out - ref_out).norm() / ref_out.norm().clamp_min(1e-6)).item()
    tol_out, tol_lse = TOL[kw["q"].dtype]
    assert rel < tol_out, f"output relative error {rel:.3e}"
    if seen.any():  # (decode_attention's tests' tolerance: relative beyond |lse| 8)
        lse_err = (lse[seen] - ref_lse[seen]).abs().max().item()
        assert lse_err < tol_lse * max(1.0, ref_lse[seen].abs().max().item() / 8), f"lse error {lse_err:.3e}"


# ----------------------------------------------------------------------------------------- CPU


# (bits, device lengths, query heads per KV head, sink / window program, model dtype, tokens on M[, balanced ragged
# rows]). Spills outside the packed loop are allowed (triton 3.6: 8 bytes for tokens on M at R = 8 with device lengths;
# 48 bytes in the sink / window program of the tokens-on-M build; 16 bytes in the balanced one-row build's prologue; the
# 16-row form at R = 16, 24 bytes, is not in the list: it spills in the loop)
VARIANTS = [(2, False, 4, False, "fp16", False), (2, True, 4, False, "fp16", False), (4, False, 4, False, "fp16", False),
            (4, True, 1, False, "fp16", False), (2, False, 8, False, "fp16", False), (2, True, 4, True, "fp16", False),
            (4, True, 4, True, "fp16", False), (2, True, 4, True, "bf16", False), (2, False, 4, False, "fp16", True),
            (2, True, 8, False, "fp16", True), (4, True, 1, False, "fp16", True), (4, False, 4, False, "bf16", True),
            (2, True, 4, True, "fp16", True), (2, False, 1, False, "fp16", True), (2, True, 1, False, "bf16", True),
            (4, True, 4, True, "fp16", True), (2, True, 4, False, "fp16", True, True),
            (2, True, 4, True, "fp16", True, True), (4, True, 4, False, "fp16", True, True),
            (2, True, 1, False, "fp16", True, True)]


# the same with the TMA ring (its last element: the stages), tokens on M
TMA_VARIANTS = [(2, False, 4, False, "fp16", True, False, 2), (2, True, 1, False, "fp16", True, False, 2),
                (4, True, 4, True, "fp16", True, False, 2), (2, True, 4, True, "bf16", True, True, 2),
                (4, False, 8, False, "fp16", True, False, 3)]


# K and V of different widths (V's bits last): the tokens-on-M builds with and without the ring, the 16-row form
MIXED_VARIANTS = [(4, True, 4, True, "fp16", True, False, 2, 2), (4, True, 4, False, "bf16", True, True, 2, 2),
                  (4, False, 1, False, "fp16", True, False, 0, 2), (4, True, 16, False, "fp16", False, False, 0, 2),
                  (2, True, 4, True, "fp16", True, False, 2, 4), (2, False, 8, False, "fp16", True, False, 0, 4)]


@pytest.fixture(scope="module")
def sm90_builds():
    """Each variant compiled for sm_90 in a fresh process: on CPU the test session runs Triton under the interpreter
    (conftest.py), whose library functions Gluon's compiler cannot take."""
    code = ("import json, sys; from kvcompile.kernels.gluon_decode import sm90_resources; "
            f"print(json.dumps([sm90_resources(*v) for v in {VARIANTS + TMA_VARIANTS!r}]"
            f" + [sm90_resources(*v[:8], v_bits=v[8]) for v in {MIXED_VARIANTS!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(VARIANTS + TMA_VARIANTS + MIXED_VARIANTS, json.loads(run.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("variant", MIXED_VARIANTS)
def test_mixed_widths_compile_for_sm90(sm90_builds, variant):
    """K4V2 and K2V4 (V's words, planes and ring stage at their own width): no spill in the packed loop, registers
    for the launch's residency, shared memory only for the ring's stages (each stage K's and V's code blocks)."""
    res = sm90_builds[variant]
    if res.get("skip"):
        pytest.skip(res["skip"])
    bits, stages, v_bits = variant[0], variant[7], variant[8]
    assert not res["forbidden"] and res["registers"] <= gd.max_registers(res["programs_per_sm"]), res
    assert res["shared"] == stages * gd.tma_stage_bytes(bits, v_bits), res
    assert res["tma_copies"] == (6 if stages else 0) and res["l2_prefetches"] == 0, res


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiles_for_sm90_without_shared_memory_or_spills(sm90_builds, variant):
    """The design (code words loaded straight into the MMA operands' registers) holds in the build: no shared
    memory, no spill in the packed loop, registers for the programs per SM the launch sizes its splits for (8, or 12
    for the one-row 2-bit tokens-on-M build: at most 168)."""
    res = sm90_builds[variant]
    if res.get("skip"):
        pytest.skip(res["skip"])
    assert res["shared"] == 0 and res["registers"] <= gd.max_registers(res["programs_per_sm"]), res
    assert not res["forbidden"], res  # no shared memory; no spill inside the packed loop
    bits, _, r, has_fp, _, tokm = variant[:6]
    want = gd.occupancy(r=r, bits=bits, has_fp=has_fp, tokens_on_m=tokm)[2] > 0
    assert (res["l2_prefetches"] > 0) == want, res  # the 4-bit tokens-on-M builds prefetch into L2 in the loop


@pytest.mark.parametrize("variant", TMA_VARIANTS)
def test_tma_ring_compiles_for_sm90(sm90_builds, variant):
    """The ring's builds: shared memory for its stages only (tiles and mbarriers), nothing stored to it but by the
    copies, six bulk copies per tile in the loop, no spill in the loop, registers for the launch's residency."""
    res = sm90_builds[variant]
    if res.get("skip"):
        pytest.skip(res["skip"])
    bits, r, has_fp, stages = variant[0], variant[2], variant[3], variant[-1]
    assert res["shared"] == stages * gd.tma_stage_bytes(bits), res
    assert res["registers"] <= gd.max_registers(res["programs_per_sm"]), res
    assert not res["forbidden"] and res["tma_copies"] == 6 and res["l2_prefetches"] == 0, res
    assert gd.tma_stages(bits, gd.occupancy(r=r, bits=bits, has_fp=has_fp, tokens_on_m=True)[1]) >= stages


@pytest.mark.parametrize("change,match", [
    (dict(v_group=64), "one group per token"),
    (dict(k_bits=4, v_bits=4, k_format="nf", v_format="nf"), "per-token affine"),
    (dict(k_bits=8), "2- or 4-bit codes"),
    (dict(k_group=64, v_group=64), "one group per token"),
])
def test_unsupported_layouts_say_why(change, match):
    base = dict(B=1, Hkv=1, r=4, NQ=1, D=128, S=0, n_quant=40, n_window=0, k_bits=2, v_bits=2, k_group=128,
                v_group=128, dtype=torch.float16, cap_extra=4, win_extra=0, device="cpu")
    kw = make_inputs(**{**base, **change})
    with pytest.raises(ValueError, match=match):
        da.decode_attention(**kw, gluon=True)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU message")
def test_cpu_says_cuda_only():
    with pytest.raises(ValueError, match="CUDA only"):  # (gluon=True)
        da.decode_attention(**inputs(device="cpu"), gluon=True)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_l2_distance_says_what_to_pass(bad):
    with pytest.raises(ValueError, match="number of tiles >= 0"):
        da.decode_attention(**inputs(device="cpu"), gluon_l2=bad)


def test_odd_capacity_needs_padded_rows():
    """Scales are read as pairs of tokens: rows must start at even tokens, and with an odd capacity a row's last pair
    reads one element past it (PackedKV allocates its per-token scale rows padded to 32 tokens)."""
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    kw = inputs(device="cpu", n_quant=300)  # capacity 304
    assert gd.storage_unsupported_reason(*(kw[n] for n in names)) is None
    odd = {n: kw[n].contiguous() if "codes" in n else kw[n][:, :, :-1].contiguous() for n in names}
    odd["k_codes"], odd["v_codes"] = kw["k_codes"][:, :, :-1].contiguous(), kw["v_codes"][:, :, :-1].contiguous()
    assert "rows at even tokens" in gd.storage_unsupported_reason(*(odd[n] for n in names))
    padded = {n: (kw[n][:, :, :-1] if "codes" not in n else odd[n]) for n in names}  # views: rows of 304, 303 used
    assert gd.storage_unsupported_reason(*(padded[n] for n in names)) is None
    from kvcompile.cache.packed import PackedKV
    from kvcompile.schemes import TensorQuant
    pk = PackedKV.empty(2, 2, 128, TensorQuant("affine", 2, 128, "token"), capacity=1001, n_sink=4, window=8)
    assert pk.scale.shape[2] % 2 == 1
    assert gd.storage_unsupported_reason(pk.codes, pk.scale, pk.zero, pk.codes, pk.scale, pk.zero) is None


# ----------------------------------------------------------------------------------------- GPU

LENGTHS = [1, 7, 63, 64, 65, 97, 128, 1000, 4099]


@st.composite
def configs(draw):
    B = draw(st.integers(1, 3))
    n_quant = draw(st.sampled_from(LENGTHS))
    fp = draw(st.booleans())  # sink / window tokens: the full-precision program
    S = draw(st.sampled_from([0, 1, 4, 7])) if fp else 0
    n_window = draw(st.sampled_from([0, 1, 7, 33, 97, 130])) if fp else 0
    win_extra = draw(st.sampled_from([0, 2, 31])) if fp else 0
    ring = fp and draw(st.booleans())
    form = draw(st.sampled_from(["host", "3", "B3"]))
    lens = None
    if form == "3":
        lens = [(S, n_quant, n_window)] * B
    elif form == "B3":
        lens = [(draw(st.integers(0, S)), draw(st.sampled_from([0] + LENGTHS)), draw(st.integers(0, n_window)))
                for _ in range(B)]
    return dict(B=B, Hkv=draw(st.integers(1, 4)), r=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
                bits=draw(st.sampled_from([2, 4])), v_bits=draw(st.sampled_from([None, None, 2, 4])),
                n_quant=n_quant, S=S, n_window=n_window, win_extra=win_extra,
                lens=lens, lens_form="3" if form == "3" else "B3", q_noncontig=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)), num_splits=draw(st.sampled_from([None, 1, 3])), ring=ring,
                dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])),
                form=draw(st.sampled_from([True, "rows", "tokens"])))


@gpu
@settings(deadline=None, max_examples=120, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs())
def test_matches_reference(case):
    case = dict(case)
    num_splits, ring, form = case.pop("num_splits"), case.pop("ring"), case.pop("form")
    if form == "tokens" and case["r"] > gd.TOKM_MAX_ROWS:
        form = "rows"
    kw = inputs(**case)
    if ring:
        kw["window_ring"] = True
    check(kw, form, num_splits=num_splits)


@gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_extreme_codes_and_scales(bits):
    """All-zero and all-ones code bytes (every code 0 / the largest), large and tiny scales."""
    kw = inputs(B=1, Hkv=2, r=4, bits=bits, n_quant=700, seed=3)
    kw["k_codes"][:, 0] = 0xFF
    kw["v_codes"][:, 1] = 0x00
    kw["k_scale"][:, 1] *= 8
    kw["v_scale"][:, 0] *= 1e-3
    check(kw)


@gpu
def test_default_takes_gluon_where_splits_are_long():
    """B x Hkv = 64 programs' worth of heads: 16 splits (one wave of 8 per SM on an H100). The tokens-on-M form (4 query
    heads per KV head) from 2 tiles per split (2048 tokens: the Gluon kernel; 1024, one tile: the Triton kernel), the
    16-row form (16 heads) from 8 (8192 tokens: Gluon; 2048: Triton)."""
    cases = [(4, 2048, True), (4, 1024, False), (16, 8192, True), (16, 2048, False)]
    da._DECODE_PLANS.clear()
    for r, n, want in cases:
        kw = inputs(B=8, Hkv=8, r=r, n_quant=n, lens=[(0, n, 0)] * 8, lens_form="3")  # device lengths: a cached plan
        for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
            kw[name] = kw[name][:, :, :n]  # capacity n: 16 chunks of n / 16 tokens
        da.decode_attention(**kw)
        plans = list(da._DECODE_PLANS._d.values())
        assert (plans[-1][1].split.fn is gd._gluon_split_kernel) == want, (r, n)


@gpu
def test_cached_plan_launch_matches_first_call():
    kw = inputs(B=2, Hkv=2, r=4, n_quant=3000, lens=[(0, 3000, 0), (0, 1500, 0)])
    first = da.decode_attention(**kw, gluon=True)
    again = da.decode_attention(**kw, gluon=True)  # the cached plan, launched directly
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def _split_constexpr(name):
    """A constexpr of the last cached plan's split launch."""
    split = list(da._DECODE_PLANS._d.values())[-1][1].split
    return split.vals[[n for n, _ in launch._params(split.fn)].index(name)]


@gpu
@pytest.mark.parametrize("aligned", [True, False])
def test_l2_prefetch_only_on_aligned_rows(aligned):
    """The 4-bit build's bulk L2 prefetch (16-byte aligned tiles only) runs where every row of codes, scales and
    zeros starts 16-byte aligned (rows of a multiple of 8 tokens) and is left out otherwise; the output is right
    either way."""
    kw = inputs(B=2, Hkv=2, r=4, bits=4, n_quant=2000, lens=[(0, 2000, 0), (0, 1923, 0)], seed=5)
    rows = 2008 if aligned else 2006  # the capacity (2004) in rows of 2008 tokens (scale rows 16-byte aligned) or 2006
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        t = kw[name]
        kw[name] = torch.zeros((*t.shape[:2], rows, *t.shape[3:]), dtype=t.dtype, device=t.device)[:, :, :t.shape[2]]
        kw[name].copy_(t)
    da._DECODE_PLANS.clear()
    check(kw, form="tokens", gluon_tma=0)  # (the TMA ring, where it runs, replaces the L2 prefetch)
    assert _split_constexpr("L2PF") == (1 if aligned else 0)


@gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_odd_capacity_in_padded_rows(bits):
    """An odd capacity whose scale / zero rows are padded (as PackedKV allocates them): the last pair of a row reads
    the padding, never a token that counts."""
    kw = inputs(B=2, Hkv=2, r=4, bits=bits, n_quant=1001, S=4, n_window=20, win_extra=8,
                lens=[(4, 1001, 20), (3, 999, 17)], seed=bits)
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        kw[name] = kw[name][:, :, :1003]  # capacity 1003 (odd) in rows of 1004
    kw["window_ring"] = True
    check(kw)


@gpu
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("fp", [False, True])
def test_ragged_rows_balanced(balance, fp):
    """Rows of very different lengths (one of them empty) with the programs shared out by the rows' work (balance)
    or the same number per row: the output matches the reference either way, and the plan is balanced where asked."""
    S, n_window = (4, 20) if fp else (0, 0)
    lens = [(S, n, n_window) for n in (5000, 0, 700, 3001)]
    kw = inputs(B=4, Hkv=2, r=4, n_quant=5000, S=S, n_window=n_window, lens=lens, seed=11)
    da._DECODE_PLANS.clear()
    check(kw, form="tokens", balance=balance)
    assert _split_constexpr("BALANCE") == balance


# ----------------------------------------------------------------------------------------- the TMA ring (v31)

def tma_storage(kw):
    """kw with its codes, scales and zeros moved into rows of a multiple of 64 tokens (views of the same capacity): the
    alignment the TMA ring reads (128-byte code rows, scale / zero rows at 16-byte multiples)."""
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        t = kw[name]
        rows = -(-t.shape[2] // 64) * 64
        kw[name] = torch.zeros((*t.shape[:2], rows, *t.shape[3:]), dtype=t.dtype, device=t.device)[:, :, :t.shape[2]]
        kw[name].copy_(t)
    return kw


@pytest.mark.parametrize("bad", [-1, 1.5, True, gd.TMA_MAX_STAGES + 1])
def test_bad_tma_stages_say_what_to_pass(bad):
    with pytest.raises(ValueError, match="number of ring stages"):
        da.decode_attention(**inputs(device="cpu"), gluon_tma=bad)


@pytest.mark.parametrize("capacity,aligned", [(1004, True), (1003, False)])
def test_tma_ring_reads_packedkv_rows_of_whole_lines(capacity, aligned):
    """PackedKV's storage takes the ring where its middle (capacity less the sink) is a multiple of 4 tokens of 2-bit
    codes (128-byte rows); on CPU the remaining reason is the device."""
    from kvcompile.cache.packed import PackedKV
    from kvcompile.schemes import TensorQuant

    pk = PackedKV.empty(2, 2, 128, TensorQuant("affine", 2, 128, "token"), capacity=capacity, n_sink=4, window=8)
    why = gd.tma_unsupported_reason(pk.codes, pk.scale, pk.zero, pk.codes, pk.scale, pk.zero)
    assert ("sm_90" in why) if aligned else ("128-byte rows" in why), why


@pytest.mark.parametrize("scheme,overrides,gluon", [("pertoken", {}, True), ("pertoken", {"v_bits": 4}, True),
                                                      ("pertoken", {"group_size": 32}, False), ("kivi", {}, False)])
def test_pertoken_scheme_is_what_the_gluon_kernel_takes(scheme, overrides, gluon):
    """The ``pertoken`` preset's storage, as kvcompile's transformers cache allocates it for a head dim of 128 (a
    capacity rounded to whole code lines), is a layout the Gluon kernel and its TMA ring take: on CPU the one reason
    left is the device. Groups of 32 channels or KIVI's per-channel keys are not."""
    import kvcompile
    from kvcompile.cache.packed import PackedKV, line_capacity

    spec = kvcompile.get_scheme(scheme, **overrides).layer_spec(0, 1)
    cap = line_capacity(1001, spec.n_sink, (spec.k, 128), (spec.v, 128))
    common = dict(capacity=cap, n_sink=spec.n_sink, window=spec.window, dtype=torch.bfloat16)
    k = PackedKV.empty(2, 8, 128, spec.k, **common)
    v = PackedKV.empty(2, 8, 128, spec.v, **common)
    why = gd.gluon_unsupported_reason(
        D=128, r=4, NQ=1, k_bits=spec.k.bits, v_bits=spec.v.bits, k_group=spec.k.group_for(128),
        v_group=spec.v.group_for(128), k_axis=spec.k.axis, k_format=spec.k.kind, v_format=spec.v.kind,
        dtype=torch.bfloat16, rope=spec.k_pre_rope, meta_dtypes=(k.scale.dtype, v.scale.dtype), kv_mixed=False)
    assert (why is None) == gluon, why
    if gluon:
        metas = (k.codes, k.scale, k.zero, v.codes, v.scale, v.zero)
        assert gd.storage_unsupported_reason(*metas) is None
        why = gd.tma_unsupported_reason(*metas)
        assert why is None if ON_GPU and torch.cuda.get_device_capability() >= (9, 0) else "sm_90" in why, why


def test_tma_stages_fit_shared_memory():
    """The ring's stages for a residency leave each program its share of an SM's shared memory."""
    for bits, v_bits in ((2, 2), (4, 4), (4, 2), (2, 4)):
        assert gd.tma_stage_bytes(bits, v_bits) == (gd.tma_stage_bytes(bits) + gd.tma_stage_bytes(v_bits)) // 2
        for pps in (8, 10, 12):
            n = gd.tma_stages(bits, pps, v_bits)
            size = gd.tma_stage_bytes(bits, v_bits)
            assert 1 <= n <= gd.TMA_MAX_STAGES
            assert pps * (n * size + 1024) <= gd.SMEM_PER_SM
            assert n == gd.TMA_MAX_STAGES or pps * ((n + 1) * size + 1024) > gd.SMEM_PER_SM


@gpu
@settings(deadline=None, max_examples=60, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs(), st.sampled_from([1, 2, 3]))
def test_tma_ring_matches_reference(case, stages):
    """The tokens-on-M form with its tiles through the TMA ring (1 to 3 stages: every tile refills a stage the one
    before it read) against the float32 reference, on the same drawn layouts as the register loads."""
    case = dict(case)
    num_splits, ring, _ = case.pop("num_splits"), case.pop("ring"), case.pop("form")
    case["r"] = min(case["r"], gd.TOKM_MAX_ROWS)
    kw = tma_storage(inputs(**case))
    if ring:
        kw["window_ring"] = True
    check(kw, "tokens", num_splits=num_splits, gluon_tma=stages)


@gpu
@pytest.mark.parametrize("bits,v_bits", [(2, 2), (4, 2)])
def test_tma_ring_v_codes_strided_apart_from_k(bits, v_bits):
    """V's code rows with other batch / head strides than K's (a longer row): the ring reads them from V's own row
    base (launch_args passes VBITS then, whatever the widths; with one row base V would be read at K's offsets)."""
    kw = tma_storage(inputs(B=2, Hkv=2, r=4, bits=bits, v_bits=v_bits, n_quant=1000, S=4, n_window=20, seed=21))
    t = kw["v_codes"]
    longer = torch.zeros((*t.shape[:2], -(-t.shape[2] // 64) * 64 + 128, t.shape[3]), dtype=t.dtype, device=t.device)
    kw["v_codes"] = longer[:, :, :t.shape[2]]
    kw["v_codes"].copy_(t)
    assert kw["v_codes"].stride()[:2] != kw["k_codes"].stride()[:2]
    check(kw, "tokens", gluon_tma=2)


@gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("balance", [True, False])
def test_tma_ring_ragged_rows(bits, balance):
    """Ragged rows (one empty) through the ring, balanced or not; the plan takes the ring."""
    lens = [(4, n, 20) for n in (5000, 0, 700, 3001)]
    kw = tma_storage(inputs(B=4, Hkv=2, r=4, bits=bits, n_quant=5000, S=4, n_window=20, lens=lens, seed=12))
    da._DECODE_PLANS.clear()
    check(kw, form="tokens", balance=balance, gluon_tma=2)
    assert _split_constexpr("TMA_STAGES") == 2 and _split_constexpr("BALANCE") == balance
    assert _split_constexpr("PDL") == (da._gdc_wait is not None)  # the merge a programmatic dependent launch


@gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_default_takes_tma_ring_where_rows_allow(bits):
    """By default the tokens-on-M form reads through the ring (TMA_DEFAULT_STAGES) where the storage allows it, as
    PackedKV allocates it for a middle of a multiple of 4 tokens."""
    from kvcompile.cache.packed import PackedKV
    from kvcompile.schemes import TensorQuant

    kw = inputs(B=2, Hkv=2, r=4, bits=bits, n_quant=990, lens=[(0, 990, 0), (0, 701, 0)], seed=4)
    for side in "kv":  # the drawn codes, scales and zeros moved into PackedKV's own tensors (middle capacity 1000)
        pk = PackedKV.empty(2, 2, 128, TensorQuant("affine", bits, 128, "token"), capacity=1004, n_sink=4, window=8,
                            device="cuda")
        for name, t in (("codes", pk.codes), ("scale", pk.scale), ("zero", pk.zero)):
            t[:, :, :kw[f"{side}_{name}"].shape[2]].copy_(kw[f"{side}_{name}"])
            kw[f"{side}_{name}"] = t
    da._DECODE_PLANS.clear()
    check(kw, form="tokens")
    assert _split_constexpr("TMA_STAGES") == gd.TMA_DEFAULT_STAGES


@gpu
def test_tma_ring_needs_aligned_rows():
    """Storage whose code rows are not 128-byte aligned: gluon_tma says why; by default the register loads run."""
    kw = inputs(B=2, Hkv=2, r=4, n_quant=999, lens=[(0, 999, 0), (0, 900, 0)], seed=2)  # capacity 1002: 64-byte rows
    with pytest.raises(ValueError, match="128-byte rows"):
        da.decode_attention(**kw, gluon="tokens", gluon_tma=2)
    da._DECODE_PLANS.clear()
    check(kw, form="tokens")
    assert _split_constexpr("TMA_STAGES") == 0 and not _split_constexpr("PDL")

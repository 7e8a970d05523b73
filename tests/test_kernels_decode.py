"""Fused packed-KV decode attention (kvcompile.kernels.decode_attention) against its float32 reference.

Without CUDA the Triton kernel runs under the interpreter (TRITON_INTERPRET=1, set here before the kernel
module is imported; triton reads it when ``@triton.jit`` decorates) on small shapes; with CUDA the same
tests run on the GPU with larger shapes and more examples.
"""

import importlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvcompile.kernels.decode_attention as da  # noqa: E402

if not ON_GPU and type(da._decode_split_kernel).__name__ != "InterpretedFunction":
    # imported earlier in this process without the interpreter: decorate again under it
    da = importlib.reload(da)

from kvcompile.kernels.reference import decode_attention_reference  # noqa: E402
try:  # tests/ has no __init__.py: pytest's default import mode puts tests/ itself on sys.path
    from kernel_inputs import TOL, bf16_coded_key_inputs, make_inputs, with_rope  # noqa: E402
except ImportError:
    from tests.kernel_inputs import TOL, bf16_coded_key_inputs, make_inputs, with_rope  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------------------- inputs


def check_against_reference(kw, **tuning):
    if tuning.pop("window_ring", False):  # the windows' layout, not a tuning knob: the reference reads it too
        kw = dict(kw, window_ring=True)
    out, lse = da.decode_attention(**kw, **tuning)
    ref_out, ref_lse = decode_attention_reference(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    q = kw["q"]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    out, lse = out.float().cpu(), lse.cpu()
    # rows that see no token (per-sequence lengths: an empty or too short sequence): out 0, lse -inf
    seen = torch.isfinite(ref_lse)
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isfinite(lse), seen), (lse, ref_lse)
    assert (out[~seen] == 0).all()
    rel = ((out - ref_out).norm() / ref_out.norm().clamp_min(1e-6)).item()
    tol_out, tol_lse = TOL[q.dtype]
    assert rel < tol_out, f"output relative error {rel:.3e}"
    if seen.any():
        lse_err = (lse[seen] - ref_lse[seen]).abs().max().item()
        assert lse_err < tol_lse * max(1.0, ref_lse[seen].abs().max().item() / 8), f"lse error {lse_err:.3e}"


# ----------------------------------------------------------------------------------------- tests

LENGTHS = [0, 1, 7, 97] if not ON_GPU else [0, 1, 7, 97, 1000, 4099]


@st.composite
def configs(draw):
    D = draw(st.sampled_from([64, 128]))
    k_bits = draw(st.sampled_from([2, 4]))
    v_bits = draw(st.sampled_from([2, 4]))
    cfg = dict(
        B=draw(st.integers(1, 3 if ON_GPU else 1)),
        Hkv=draw(st.integers(1, 4 if ON_GPU else 2)),
        r=draw(st.sampled_from([1, 3, 4, 8])),
        NQ=draw(st.sampled_from([1, 1, 2, 4])),
        D=D,
        S=draw(st.sampled_from([0, 1, 4, 7])),
        n_quant=draw(st.sampled_from(LENGTHS)),
        n_window=draw(st.sampled_from(LENGTHS[:4])),
        k_bits=k_bits,
        v_bits=v_bits,
        k_group=draw(st.sampled_from([D, D, 16, 32, 64])),
        v_group=draw(st.sampled_from([D, D, 16, 32, 64])),
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])),
        amp=draw(st.sampled_from([0.5, 1.0, 3.0])),
        q_noncontig=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if cfg["S"] + cfg["n_quant"] + cfg["n_window"] < cfg["NQ"]:
        cfg["n_window"] = 7
    tuning = dict(
        num_splits=draw(st.sampled_from([None, None, 1, 2, 5])),
        block_n=draw(st.sampled_from([16, 32, 64] if ON_GPU else [16, 32])),
    )
    return cfg, tuning


@settings(deadline=None, max_examples=80 if ON_GPU else 60, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs())
def test_matches_reference(case):
    cfg, tuning = case
    check_against_reference(make_inputs(**cfg), **tuning)


# every combination of empty / odd lengths of the three parts, one small shape each
_PART_CASES = [(s, nq, nw) for s in (0, 1, 7) for nq in (0, 1, 7, 97) for nw in (0, 1, 7, 97)
               if s + nq + nw >= 2 and (ON_GPU or (s, nq, nw) in {
                   (0, 97, 0), (0, 97, 1), (0, 1, 97), (1, 0, 7), (1, 97, 0), (1, 7, 1),
                   (7, 0, 0), (7, 97, 97), (0, 7, 0), (7, 1, 97)})]


@pytest.mark.parametrize("S,n_quant,n_window", _PART_CASES)
def test_part_lengths(S, n_quant, n_window):
    kw = make_inputs(B=1, Hkv=2, r=4, NQ=2, D=64, S=S, n_quant=n_quant, n_window=n_window, k_bits=2,
                     v_bits=2, k_group=64, v_group=64, dtype=torch.float16, seed=S * 10000 + n_quant * 100 + n_window)
    check_against_reference(kw, block_n=16, num_splits=3)


@pytest.mark.parametrize("r", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa_ratios_128(r, dtype):
    kw = make_inputs(B=1, Hkv=2, r=r, NQ=1, D=128, S=1, n_quant=97 if ON_GPU else 33, n_window=7, k_bits=2,
                     v_bits=4, k_group=128, v_group=128, dtype=dtype, q_noncontig=True, seed=r)
    check_against_reference(kw, block_n=32)


def test_single_new_token_uses_all_history():
    # causal only among new tokens: with NQ = 1 every valid token counts, garbage past n_quant never does
    kw = make_inputs(B=1, Hkv=1, r=4, NQ=1, D=64, S=0, n_quant=40, n_window=0, k_bits=2, v_bits=2,
                     k_group=64, v_group=64, dtype=torch.float16, cap_extra=30, win_extra=0, seed=3)
    kw["k_codes"][:, :, 40:] = 255
    kw["k_zero"][:, :, 40:] = 1e4
    check_against_reference(kw, block_n=16)


def _small_kw(**over):
    cfg = dict(B=1, Hkv=1, r=1, NQ=1, D=64, S=0, n_quant=5, n_window=0, k_bits=2, v_bits=2, k_group=64,
               v_group=64, dtype=torch.float16)
    cfg.update(over)
    return make_inputs(**cfg)


@pytest.mark.parametrize("mutate,match", [
    (lambda kw: kw.update(k_bits=3), "bits"),
    (lambda kw: kw.update(q=kw["q"].float()), "dtype"),
    (lambda kw: kw.update(k_group_size=8), "group"),
    (lambda kw: kw.update(k_codes=kw["k_codes"][..., :8]), "k_codes shape"),
    (lambda kw: kw.update(v_scale=kw["v_scale"].to(torch.int32)), "v_scale dtype"),
    (lambda kw: kw.update(n_quant=10**6), "n_quant"),
    (lambda kw: kw.update(k_window=kw["k_window"].to(torch.bfloat16)), "k_window dtype"),
])
def test_validation_errors(mutate, match):
    kw = _small_kw()
    mutate(kw)
    with pytest.raises(ValueError, match=match):
        da.decode_attention(**kw)


def test_head_dim_error():
    q = torch.randn(1, 1, 1, 96, dtype=torch.float16, device=DEVICE)
    kw = _small_kw()
    kw["q"] = q
    with pytest.raises(ValueError, match="head dim 96"):
        da.decode_attention(**kw)


def test_profitability_helper():
    assert not da.fused_decode_is_profitable(batch=1, kv_heads=8, head_dim=128, seq_len=64)
    assert not da.fused_decode_is_profitable(batch=8, kv_heads=8, head_dim=128, seq_len=1024)
    assert da.fused_decode_is_profitable(batch=8, kv_heads=8, head_dim=128, seq_len=1024, cuda_graph=True)
    assert da.fused_decode_is_profitable(batch=8, kv_heads=8, head_dim=128, seq_len=32768)
    assert da.fused_decode_is_profitable(batch=1, kv_heads=8, head_dim=128, seq_len=131072)


def test_num_splits_fill_the_gpu():
    n = da.choose_num_splits(batch=8, kv_heads=8, seq_len=32768, block_n=64, num_sms=132)
    assert 512 <= 64 * n <= 8 * 132  # one full wave of 1-warp programs
    assert da.choose_num_splits(batch=1, kv_heads=8, seq_len=100, block_n=64, num_sms=132) == 2


# ------------------------------------------------------------------- kernel variants (constexpr flags)
# fill_rows: rows = (token sub-block, query row) with a per-sub-row softmax merged at the end; fp_split:
# one extra program per KV head for the full-precision sink + window; fp_contig: contiguous fp tiles.

@st.composite
def variant_configs(draw):
    cfg, tuning = draw(configs())
    cfg["NQ"] = draw(st.sampled_from([1, 1, 2, 3, 4]))  # odd NQ: causal rows not a power of two
    cfg["n_quant"] = draw(st.sampled_from(LENGTHS[1:] + [33, 65]))
    if cfg["S"] + cfg["n_quant"] + cfg["n_window"] < cfg["NQ"]:
        cfg["n_window"] = 7
    tuning.update(
        fill_rows=draw(st.booleans()),
        fp_split=draw(st.booleans()),
        fp_contig=draw(st.sampled_from([False, False, True])),
        use_dot=draw(st.sampled_from([None, True])),  # True: MHA (r = 1) takes the 16-row MMA path too
        num_splits=draw(st.sampled_from([None, 1, 2, 3, 5])),
        group_fill=draw(st.sampled_from([None, False])),  # per-token groups < D: group fill or registers
        group_bcast=draw(st.sampled_from([None, False])),  # group fill's scales: broadcast per group or per row
        head_fill=draw(st.sampled_from([None, True, 2])),  # several KV heads per program (one group per token)
        prefetch=draw(st.sampled_from([None, True, False])),  # per-token scales / zeros loaded one tile ahead
        lazy_rescale=draw(st.sampled_from([None, True])),  # the rescale skipped where no row's max grew
        fp_block_n=draw(st.sampled_from([None, 16, 32])),  # the sink / window tiles' own size
        window_ring=draw(st.booleans()),  # windows as rings (PackedKV's layout)
    )
    return cfg, tuning


@settings(deadline=None, max_examples=60 if ON_GPU else 30, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(variant_configs())
def test_variants_match_reference(case):
    cfg, tuning = case
    check_against_reference(make_inputs(**cfg), **tuning)


@pytest.mark.parametrize("layout", [
    dict(r=4, NQ=1, k_bits=2, v_bits=2, k_group=128, v_group=128),
    dict(r=4, NQ=3, k_bits=4, v_bits=4, k_group=128, v_group=128),
    dict(r=1, NQ=1, k_bits=2, v_bits=4, k_group=128, v_group=128),  # MHA: row fill
    dict(r=4, NQ=1, k_bits=2, v_bits=2, k_group=128, v_group=32),  # group fill on V
    dict(r=4, NQ=2, k_bits=2, v_bits=2, k_group=32, v_group=32, k_axis="channel"),  # KIVI
])
def test_lazy_rescale_is_exact(layout):
    # skipping the rescale only where every alpha is 1 changes no bit of the output or the lse; on random data
    # the running max rises on the first tiles of a split and seldom after, so both branches run
    layout = dict(layout)
    kw = make_inputs(B=2, Hkv=2, D=128, S=3, n_quant=160, n_window=5, dtype=torch.float16, seed=7, **layout)
    kw["q"] = kw["q"] * 4  # sharper scores: the max moves on fewer tiles
    for tuning in (dict(block_n=16, num_splits=2), dict(block_n=32, num_splits=1)):
        a = da.decode_attention(**kw, **tuning, lazy_rescale=True)
        b = da.decode_attention(**kw, **tuning, lazy_rescale=False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    check_against_reference(kw, block_n=16, lazy_rescale=True)


@pytest.mark.parametrize("layout", [
    dict(r=4, NQ=1, k_bits=2, v_bits=2, k_group=128, v_group=128, S=3, n_window=5),  # sink + window: fp tiles too
    dict(r=4, NQ=3, k_bits=4, v_bits=4, k_group=128, v_group=128, S=0, n_window=0),
    dict(r=1, NQ=1, k_bits=2, v_bits=2, k_group=128, v_group=128, S=3, n_window=5),  # MHA: row fill
    dict(r=4, NQ=1, k_bits=2, v_bits=2, k_group=128, v_group=32, S=3, n_window=5),  # group fill on V
    dict(r=4, NQ=1, k_bits=2, v_bits=2, k_group=32, v_group=32, k_axis="channel", S=0, n_window=40,
         lens=[(0, 128, 40), (0, 96, 33)], v_lag=[16, 9]),  # KIVI, V ahead of K (its lag tiles stay fp)
    dict(r=4, NQ=1, k_bits=2, v_bits=2, k_group=128, v_group=128, S=3, n_window=5, dtype=torch.bfloat16),
])
def test_subnormal_value_codes_are_exact(layout):
    """Value codes read as fp16 subnormals (2**-24 * code, no offset to subtract; v_denormal, the default) against
    1024 + code less 1024. The accumulators are held 2**-24 small around the packed loop (exact in float32), so the fp
    tiles before and after it add to the same sums: bit for bit in the interpreter. The H100's MMA accumulates the
    scaled products with other last-bit roundings (measured: output relative differences 1e-5 to 7e-5 in fp16, up to
    3.5e-4 in bf16, one or two units of the output's last place; the same lse), so there the two must agree that
    closely and be as near the reference."""
    layout = dict(layout)
    dtype = layout.pop("dtype", torch.float16)
    kw = make_inputs(B=2, Hkv=2, D=128, n_quant=160, dtype=dtype, seed=11, **layout)
    ref_out, _ = decode_attention_reference(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    for tuning in (dict(block_n=16, num_splits=3), dict(num_splits=1), dict(fp_split=False, num_splits=2)):
        a = da.decode_attention(**kw, **tuning, v_denormal=True)
        b = da.decode_attention(**kw, **tuning, v_denormal=False)
        if not ON_GPU:
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), tuning
            continue
        assert torch.equal(a[1], b[1]), tuning
        diff = ((a[0].float() - b[0].float()).norm() / b[0].float().norm()).item()
        assert diff < (2e-4 if dtype == torch.float16 else 1e-3), (tuning, diff)
        err_a, err_b = (((o[0].float().cpu() - ref_out).norm() / ref_out.norm()).item() for o in (a, b))
        assert err_a < 1.05 * err_b + 1e-5, (tuning, err_a, err_b)
    check_against_reference(kw, v_denormal=True)


@pytest.mark.parametrize("seed", [18860, 18862])
def test_bf16_grouped_keys_in_registers(seed):
    # a bf16 model's keys in groups of 16 beside V in one group per head (group fill cannot take different sizes):
    # the keys dequantized in registers must not be rounded to bf16 (2.5e-2 output error at amp 3 before session 9)
    kw = make_inputs(B=1, Hkv=1, r=3, NQ=1, D=64, S=0, n_quant=7, n_window=7, k_bits=2, v_bits=2, k_group=16,
                     v_group=64, dtype=torch.bfloat16, amp=3.0, seed=seed)
    check_against_reference(kw, block_n=16, fp_split=False, group_fill=False)
    check_against_reference(kw)


@pytest.mark.parametrize("fp_bn,contig", [(16, False), (16, True), (32, False), (32, True)])
@pytest.mark.parametrize("layout", [
    dict(r=4, NQ=1, k_bits=2, v_bits=2, k_group=128, v_group=128, S=4, n_window=37),
    dict(r=4, NQ=3, k_bits=4, v_bits=2, k_group=128, v_group=128, S=3, n_window=70),  # causal rows in the window
    dict(r=2, NQ=1, k_bits=2, v_bits=2, k_group=32, v_group=32, k_axis="channel", S=0, n_window=40),  # KIVI
])
def test_fp_tile_sizes(layout, fp_bn, contig):
    # the sink / window tiles at their own size (FP_BN), loaded by plane or contiguously, with and without the
    # full-precision program (fp_split), several splits; KIVI's V ahead of K in the window (v_lag) in one layout
    layout = dict(layout)
    lens = None
    if layout.get("k_axis") == "channel":
        lens = [(0, 64, 40), (0, 32, 33)]
        layout["v_lag"] = [8, 31]
    kw = make_inputs(B=2, Hkv=2, D=128, n_quant=97 if lens is None else 0, dtype=torch.float16, seed=fp_bn + contig,
                     lens=lens, **layout)
    for tuning in (dict(block_n=32, num_splits=3, fp_split=True), dict(block_n=16, num_splits=2, fp_split=False)):
        check_against_reference(kw, fp_block_n=fp_bn, fp_contig=contig, **tuning)


@pytest.mark.parametrize("r,NQ", [(1, 1), (3, 1), (4, 1), (8, 1), (1, 3), (4, 3), (2, 2)])
@pytest.mark.parametrize("block_n", [16, 32] if not ON_GPU else [16, 32, 64])
def test_fill_rows_gqa_ratios(r, NQ, block_n):
    # every sub-block shape (SUB = 8, 4, 2), odd lengths so sub-blocks end mid-tile, sink + window + splits
    kw = make_inputs(B=1, Hkv=2, r=r, NQ=NQ, D=64, S=3, n_quant=61, n_window=5, k_bits=2, v_bits=4,
                     k_group=64, v_group=64, dtype=torch.float16, seed=r * 100 + NQ)
    check_against_reference(kw, block_n=block_n, num_splits=3, fill_rows=True, use_dot=True, fp_split=True)


@pytest.mark.parametrize("r,NQ", [(1, 1), (3, 1), (4, 1), (8, 1), (4, 3), (2, 2)])
@pytest.mark.parametrize("k_group,v_group", [(128, 32), (128, 64), (32, 32), (64, 128), (64, 64), (32, 64), (16, 16), (128, 16)])
def test_group_fill_gqa_ratios(r, NQ, k_group, v_group):
    # group fill (per-token groups below D): MMA rows (channel group, query row), 16 to 64 rows, grouped V,
    # grouped K or both; sink, window, splits, odd lengths, and KIVI's per-channel keys with V flushed ahead
    # of K in one case each
    kw = make_inputs(B=1, Hkv=2, r=r, NQ=NQ, D=128, S=3, n_quant=61, n_window=5, k_bits=2, v_bits=2,
                     k_group=k_group, v_group=v_group, dtype=torch.float16, seed=r * 100 + NQ + v_group + k_group)
    check_against_reference(kw, block_n=16, num_splits=3, group_fill=True, fp_split=True)
    check_against_reference(kw, block_n=32, num_splits=1, group_fill=True)
    check_against_reference(kw, block_n=16, num_splits=2, group_fill=True, group_bcast=False)
    if 16 in (k_group, v_group):  # 32-64 MMA rows: the multi-warp builds (bench_attention's ROWS32_VARIANTS)
        check_against_reference(kw, block_n=32, num_warps=2, programs_per_sm=4)
        check_against_reference(kw, block_n=64, num_warps=4, programs_per_sm=2)
    if r == 4 and NQ == 1 and k_group == 128:
        kw = make_inputs(B=2, Hkv=1, r=r, NQ=1, D=128, S=0, n_quant=0, n_window=0, k_bits=2, v_bits=2,
                         k_group=32, v_group=v_group, dtype=torch.bfloat16, k_axis="channel",
                         lens=[(0, 64, 40), (0, 32, 33)], v_lag=[8, 31], seed=v_group)
        check_against_reference(kw, group_fill=True)
        check_against_reference(kw, group_fill=True, kchan_dequant=True)


@pytest.mark.parametrize("r,NQ,Hkv", [(1, 1, 8), (2, 1, 4), (3, 1, 4), (4, 1, 4), (8, 1, 2), (4, 3, 4), (2, 2, 6)])
def test_head_fill_gqa_ratios(r, NQ, Hkv):
    # head fill: rows (KV head, query row) of several heads per program; every rows-per-head shape, Hkv not a
    # power of two (6: two heads per program), sink + window + splits, fp_split, odd lengths, 4-bit, bf16
    kw = make_inputs(B=2, Hkv=Hkv, r=r, NQ=NQ, D=64, S=3, n_quant=61, n_window=5, k_bits=2, v_bits=4,
                     k_group=64, v_group=64, dtype=torch.float16, seed=r * 100 + NQ)
    check_against_reference(kw, block_n=16, num_splits=3, head_fill=True, fp_split=True)
    check_against_reference(kw, block_n=32, num_splits=1, head_fill=True)
    check_against_reference(kw, block_n=16, num_splits=2, head_fill=2)
    kw = make_inputs(B=2, Hkv=Hkv, r=r, NQ=NQ, D=128, S=0, n_quant=0, n_window=0, k_bits=4, v_bits=2,
                     k_group=128, v_group=128, dtype=torch.bfloat16, lens=[(0, 40, 7), (0, 13, 0)], seed=NQ)
    check_against_reference(kw, block_n=16, head_fill=True)


@settings(deadline=None, max_examples=20 if ON_GPU else 16, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(D=st.sampled_from([64, 128]), r=st.sampled_from([1, 3, 4]), NQ=st.sampled_from([1, 1, 2]),
       k_bits=st.sampled_from([2, 4]), k_group=st.sampled_from([16, 32, 0]), v=st.sampled_from([(2, 16), (2, 0), (4, 32)]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), rotary=st.sampled_from([1.0, 0.5]),
       permuted=st.booleans(), n_quant=st.sampled_from([1, 7, 61] if not ON_GPU else [1, 61, 1000]),
       tuning=st.sampled_from([{}, {"num_splits": 3}, {"block_n": 16, "fp_split": True}, {"lens": True},
                               {"rope_table": False}, {"rope_table": True}, {"block_n": 32}]),
       seed=st.integers(0, 1000))
def test_keys_before_rope_match_reference(D, r, NQ, k_bits, k_group, v, dtype, rotary, permuted, n_quant, tuning,
                                          seed):
    """Keys quantized before RoPE (skvq's pre_rope): the kernel rotates the packed middle by its positions S + t
    per element; the reference rotates the dequantized keys with the cache's own rotate in model channel order."""
    tuning = dict(tuning)
    lens = [(3, n_quant, 5), (3, max(0, n_quant - 5), 2)] if tuning.pop("lens", False) else None
    kw = make_inputs(B=2, Hkv=2, r=r, NQ=NQ, D=D, S=3, n_quant=n_quant, n_window=5, k_bits=k_bits, v_bits=v[0],
                     k_group=k_group or D, v_group=v[1] or D, dtype=dtype, seed=seed, lens=lens)
    check_against_reference(with_rope(kw, int(D * rotary), permuted, seed), **tuning)


@settings(deadline=None, max_examples=20 if ON_GPU else 14, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(D=st.sampled_from([64, 128]), r=st.sampled_from([1, 3, 4]), NQ=st.sampled_from([1, 1, 2]),
       k=st.sampled_from([(2, 16), (2, 0), (4, 32)]), v_group=st.sampled_from([16, 32, 0]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), rope=st.booleans(),
       n_quant=st.sampled_from([1, 7, 61] if not ON_GPU else [1, 61, 1000]),
       tuning=st.sampled_from([{}, {"num_splits": 3}, {"block_n": 32, "fp_split": True}, {"lens": True},
                               {"fill_rows": True, "use_dot": True}, {"rope_table": True}]),
       seed=st.integers(0, 1000))
def test_ternary_values_match_reference(D, r, NQ, k, v_group, dtype, rope, n_quant, tuning, seed):
    """Ternary values (1.5 bits, 5 base-3 digits per byte: skvq's default V) dequantized per element in natural
    channel order, beside per-token keys after or before RoPE (skvq's defaults: both)."""
    tuning = dict(tuning)
    lens = [(3, n_quant, 5), (3, max(0, n_quant - 5), 2)] if tuning.pop("lens", False) else None
    kw = make_inputs(B=2, Hkv=2, r=r, NQ=NQ, D=D, S=3, n_quant=n_quant, n_window=5, k_bits=k[0], v_bits=1.5,
                     k_group=k[1] or D, v_group=v_group or D, dtype=dtype, seed=seed, lens=lens)
    if rope:
        kw = with_rope(kw, D, True, seed)
    check_against_reference(kw, **tuning)


def test_keys_before_rope_validation():
    kw = make_inputs(B=1, Hkv=1, r=2, NQ=1, D=64, S=0, n_quant=9, n_window=0, k_bits=2, v_bits=2, k_group=64,
                     v_group=64, dtype=torch.float16)
    with pytest.raises(ValueError, match="k_rope must be float32"):
        da.decode_attention(**kw, k_rope=torch.ones(40, device=DEVICE))
    kc = make_inputs(B=1, Hkv=1, r=2, NQ=1, D=64, S=0, n_quant=9, n_window=0, k_bits=2, v_bits=2, k_group=32,
                     v_group=64, dtype=torch.float16, k_axis="channel")
    with pytest.raises(ValueError, match="affine 2- or 4-bit keys in per-token groups"):
        da.decode_attention(**kc, k_rope=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="k_perm must be"):
        da.decode_attention(**kw, k_rope=torch.ones(8, device=DEVICE), k_perm=torch.zeros(2, 64, dtype=torch.int64,
                                                                                             device=DEVICE))


@pytest.mark.parametrize("r,NQ", [(4, 1), (8, 1), (3, 1), (2, 3)])
def test_prefetch_matches_reference(r, NQ):
    # scales / zeros loaded one tile ahead: odd lengths (a split's last tile and the tile past its end masked),
    # sink + window, splits, per-sequence lengths
    kw = make_inputs(B=2, Hkv=2, r=r, NQ=NQ, D=64, S=3, n_quant=61, n_window=5, k_bits=2, v_bits=4,
                     k_group=64, v_group=64, dtype=torch.float16, seed=r * 10 + NQ)
    for tuning in (dict(block_n=16, num_splits=3), dict(block_n=32, num_splits=1), dict(block_n=16, fp_split=True)):
        check_against_reference(kw, prefetch=True, **tuning)
    kw = make_inputs(B=2, Hkv=1, r=r, NQ=NQ, D=128, S=0, n_quant=0, n_window=0, k_bits=2, v_bits=2, k_group=128,
                     v_group=128, dtype=torch.bfloat16, lens=[(0, 45, 3), (0, 17, 0)], seed=NQ)
    check_against_reference(kw, prefetch=True, block_n=16)


# ------------------------------------------------- 8-bit codes: int8 / fp8 (one absmax scale per token), affine 8-bit


@st.composite
def eight_bit_configs(draw):
    D = draw(st.sampled_from([64, 128]))
    sides = {}
    for n in "kv":
        fmt = draw(st.sampled_from(["int8", "fp8", "affine8", "affine8", "other"]))
        if fmt == "other":  # the other side 2- or 4-bit affine (one group per token or group fill / registers)
            sides[n] = dict(bits=draw(st.sampled_from([2, 4])), group=draw(st.sampled_from([D, 32])), fmt="affine")
        else:
            sides[n] = dict(bits=8, group=D, fmt="affine" if fmt == "affine8" else fmt)
    if 8 not in (sides["k"]["bits"], sides["v"]["bits"]):
        sides["k"] = dict(bits=8, group=D, fmt="int8")
    lens = None
    S, n_quant, n_window = draw(st.sampled_from([0, 1, 7])), draw(st.sampled_from(LENGTHS)), draw(
        st.sampled_from(LENGTHS[:4]))
    B = draw(st.integers(1, 3 if ON_GPU else 2))
    if draw(st.booleans()):  # per-sequence lengths on the device
        lens = [(draw(st.sampled_from(sorted({0, S}))), draw(st.sampled_from(LENGTHS)),
                 draw(st.sampled_from(LENGTHS[:4]))) for _ in range(B)]
    cfg = dict(B=B, Hkv=draw(st.integers(1, 3 if ON_GPU else 2)), r=draw(st.sampled_from([1, 3, 4, 8])),
               NQ=draw(st.sampled_from([1, 1, 2, 3])), D=D, S=S, n_quant=n_quant, n_window=n_window,
               k_bits=sides["k"]["bits"], v_bits=sides["v"]["bits"], k_group=sides["k"]["group"],
               v_group=sides["v"]["group"], k_format=sides["k"]["fmt"], v_format=sides["v"]["fmt"],
               dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])), amp=draw(st.sampled_from([0.5, 1.0, 3.0])),
               q_noncontig=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)), lens=lens)
    if lens is None and S + n_quant + n_window < cfg["NQ"]:
        cfg["n_window"] = 7
    tuning = dict(num_splits=draw(st.sampled_from([None, 1, 3])),
                  block_n=draw(st.sampled_from([None, 16, 32, 64] if ON_GPU else [16, 32])),
                  prefetch=draw(st.sampled_from([None, False])), fp_split=draw(st.sampled_from([None, False, True])),
                  use_dot=draw(st.sampled_from([None, True])), fill_rows=draw(st.sampled_from([None, True])))
    return cfg, tuning


@settings(deadline=None, max_examples=60 if ON_GPU else 24, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(eight_bit_configs())
def test_eight_bit_matches_reference(case):
    cfg, tuning = case
    check_against_reference(make_inputs(**cfg), **tuning)


@st.composite
def nf4_configs(draw):
    # NF4 codebook codes (the nqkv scheme) on one or both sides, one group per token or groups of 32 / 64
    # through group fill; the other side NF4, affine or int8
    D = draw(st.sampled_from([64, 128]))
    g = draw(st.sampled_from([D, 32, 64]))
    other = draw(st.sampled_from(["nf", "nf", "affine2", "affine4", "int8"]))
    nf = dict(bits=4, group=g, fmt="nf")
    o = {"nf": nf, "affine2": dict(bits=2, group=draw(st.sampled_from([D, g])), fmt="affine"),
         "affine4": dict(bits=4, group=D, fmt="affine"), "int8": dict(bits=8, group=D, fmt="int8")}[other]
    k, v = (nf, o) if draw(st.booleans()) else (o, nf)
    S, n_quant, n_window = draw(st.sampled_from([0, 1, 7])), draw(st.sampled_from(LENGTHS)), draw(
        st.sampled_from(LENGTHS[:4]))
    cfg = dict(B=draw(st.integers(1, 3 if ON_GPU else 2)), Hkv=draw(st.integers(1, 3 if ON_GPU else 2)),
               r=draw(st.sampled_from([1, 3, 4, 8])), NQ=draw(st.sampled_from([1, 1, 2])), D=D, S=S,
               n_quant=n_quant, n_window=n_window, k_bits=k["bits"], v_bits=v["bits"], k_group=k["group"],
               v_group=v["group"], k_format=k["fmt"], v_format=v["fmt"],
               dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])), amp=draw(st.sampled_from([0.5, 1.0, 3.0])),
               q_noncontig=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))
    if S + n_quant + n_window < cfg["NQ"]:
        cfg["n_window"] = 7
    tuning = dict(num_splits=draw(st.sampled_from([None, 1, 3])),
                  block_n=draw(st.sampled_from([None, 16, 32, 64] if ON_GPU else [16, 32])),
                  prefetch=draw(st.sampled_from([None, False])), fp_split=draw(st.sampled_from([None, False, True])))
    return cfg, tuning


@settings(deadline=None, max_examples=50 if ON_GPU else 20, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(nf4_configs())
def test_nf4_matches_reference(case):
    cfg, tuning = case
    check_against_reference(make_inputs(**cfg), **tuning)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [64, 32])
def test_nf4_every_code(dtype, g):
    # all 16 codes in both nibbles of a byte, in every channel position of the planes
    kw = make_inputs(B=1, Hkv=1, r=4, NQ=1, D=64, S=0, n_quant=0, n_window=0, k_bits=4, v_bits=4, k_group=g,
                     v_group=g, dtype=dtype, k_format="nf", v_format="nf", cap_extra=64, seed=6)
    b = torch.arange(256, dtype=torch.uint8)
    for side in "kv":
        kw[f"{side}_codes"][0, 0, :64] = b[torch.randperm(256, generator=torch.Generator().manual_seed(2))].view(
            8, 32).repeat(8, 1).to(kw[f"{side}_codes"].device)
    kw["n_quant"] = 64
    check_against_reference(kw, block_n=32)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "affine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eight_bit_extreme_codes(fmt, dtype):
    # every byte value a writer produces (int8: -127..127, fp8: all but NaN, subnormals included) in the
    # middle, against the reference's dequantization; large and tiny scales
    kw = make_inputs(B=1, Hkv=1, r=4, NQ=1, D=64, S=0, n_quant=0, n_window=0, k_bits=8, v_bits=8, k_group=64,
                     v_group=64, dtype=dtype, k_format=fmt, v_format=fmt, cap_extra=256, seed=5)
    codes = torch.arange(256, dtype=torch.int64)
    if fmt == "int8":
        codes = codes[codes != 128]  # -128 is never written (clamp to +-127)
    elif fmt == "fp8":
        codes = codes[(codes & 0x7F) != 0x7F]  # NaN
    codes = codes.to(torch.uint8)
    n = codes.numel()
    perm = torch.randperm(n * 64, generator=torch.Generator().manual_seed(1)) % n
    for side in "kv":
        kw[f"{side}_codes"][0, 0, :n] = codes[perm].view(n, 64).to(kw[f"{side}_codes"].device)
    kw["n_quant"] = n
    check_against_reference(kw, block_n=32)


def test_eight_bit_launch_defaults():
    # GQA: four warps at BLOCK_N 64 (memory bound; one warp spilled at 64 offline); MHA's row fill: one warp at
    # BLOCK_N 32; no head fill, format codes and the fp16 magic number for bf16 models
    from kvcompile.kernels import sass_probe

    _, got = sass_probe.record_launch("int8_bf16", head_fill=True)
    kw = got["kwargs"]
    assert kw["BLOCK_N"] == 64 and kw["num_warps"] == 4 and kw["HFILL"] == 1 and kw["K_FMT"] == 1 and kw["V_FMT"] == 1
    _, got = sass_probe.record_launch("int8mha")
    assert got["kwargs"]["BLOCK_N"] == 32 and got["kwargs"]["num_warps"] == 1
    assert kw["MAGIC"] == 0x6400 and kw["MAGIC_VAL"] == 1152.0 and kw["V_MAGIC_VAL"] == 1152.0
    _, got = sass_probe.record_launch("fp8")
    assert got["kwargs"]["K_FMT"] == 2 and got["kwargs"]["MAGIC_VAL"] == 0.0


def _set(**kv):
    return lambda kw: kw.update(kv)


@pytest.mark.parametrize("build,mutate,match", [
    (dict(), _set(k_format="int8", k_zero=None), "needs k_bits=8"),  # int8 over 2-bit codes
    (dict(), _set(v_format="nf4"), "v_format='nf4' unsupported"),
    (dict(k_bits=8, k_format="int8"), lambda kw: kw.update(k_zero=kw["k_scale"]), "k_zero must be None"),
    (dict(k_bits=8), _set(k_zero=None), "k_zero must be a tensor"),  # affine 8-bit has a zero point
    (dict(k_bits=8), lambda kw: kw.update(k_group_size=32, k_scale=kw["k_scale"].expand(1, 1, -1, 2),
                                          k_zero=kw["k_zero"].expand(1, 1, -1, 2)), "one group per token"),
    (dict(k_bits=8), lambda kw: kw.update(k_codes=kw["k_codes"][..., 1:]), "k_codes shape"),
    (dict(), _set(k_format="nf", k_zero=None), "takes 4-bit codes"),  # NF over 2-bit codes
    # NF4 keys in groups of 64 with affine V in groups of 32: group fill takes one group size
    (dict(D=128, k_bits=4, k_group=64, v_group=32, k_format="nf"), lambda kw: None, "need group fill"),
])
def test_eight_bit_validation_errors(build, mutate, match):
    kw = _small_kw(**build)
    mutate(kw)
    with pytest.raises(ValueError, match=match):
        da.decode_attention(**kw)


def test_head_fill_takes_four_heads_for_gqa4():
    # the launcher's head count: 16 rows / rows per head, capped, dividing Hkv; off where it does not apply
    from kvcompile.kernels import sass_probe

    for tune, want in ((dict(head_fill=True), 4), (dict(head_fill=2), 2), (dict(head_fill=False), 1)):
        _, got = sass_probe.record_launch("hf4", **tune)
        assert got["kwargs"]["HFILL"] == want and got["kwargs"]["M_PAD"] == 16, tune
    _, got = sass_probe.record_launch("vg32", head_fill=True)  # grouped V: group fill, not head fill
    assert got["kwargs"]["HFILL"] == 1 and got["kwargs"]["GFILL"] == 4


def test_fp_split_only_fp_parts_and_empty_middle():
    # fp_split with no packed tokens falls back to the plain split; with packed tokens the last program
    # takes sink + window
    for n_quant in (0, 1, 40):
        kw = make_inputs(B=1, Hkv=1, r=4, NQ=2, D=64, S=4, n_quant=n_quant, n_window=9, k_bits=2, v_bits=2,
                         k_group=64, v_group=64, dtype=torch.float16, seed=n_quant)
        check_against_reference(kw, block_n=16, fp_split=True, fill_rows=True)


# ------------------------------------------------- lengths on the device, per sequence (no host sync)
# lengths= [B, 3] / [3] device tensors of (n_sink, n_quant, n_window); the grid is sized from the
# capacities and each program derives its row's chunk in the kernel.

PART = [0, 1, 7, 97] if not ON_GPU else [0, 1, 7, 97, 1000, 4099]


@st.composite
def per_sequence_configs(draw):
    cfg, tuning = draw(configs())
    B = draw(st.integers(2, 3 if not ON_GPU else 5))
    s_cap = draw(st.sampled_from([0, 4, 7]))
    lens = [(draw(st.sampled_from(sorted({0, min(1, s_cap), s_cap}))), draw(st.sampled_from(PART)),
             draw(st.sampled_from(PART[:4]))) for _ in range(B)]
    cfg.update(B=B, S=s_cap, n_quant=0, n_window=0, lens=lens, NQ=draw(st.sampled_from([1, 1, 2, 3])),
               lens_form="B3")
    if not ON_GPU:
        cfg.update(Hkv=1, r=draw(st.sampled_from([1, 4, 8])))
    if draw(st.booleans()):  # per-channel keys (KIVI) in the same draw
        cfg["k_axis"] = "channel"
        cfg["k_group"] = draw(st.sampled_from([16, 32]))
        tuning["block_n"] = draw(st.sampled_from([None, 16]))
        if ON_GPU and cfg["k_group"] == 32:
            tuning["block_n"] = draw(st.sampled_from([None, 16, 32]))
    tuning.update(fp_split=draw(st.sampled_from([None, False, True])), fill_rows=draw(st.sampled_from([None, True])),
                  use_dot=draw(st.sampled_from([None, True])),
                  balance=draw(st.sampled_from([None, False])),  # programs shared out by the rows' work (default)
                  window_ring=draw(st.booleans()))  # windows as rings: each row's own n_quant rotates its window
    return cfg, tuning


@settings(deadline=None, max_examples=30 if ON_GPU else 14, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(per_sequence_configs())
def test_per_sequence_lengths_match_reference(case):
    cfg, tuning = case
    check_against_reference(make_inputs(**cfg), **tuning)


@pytest.mark.parametrize("fp_split", [False, True])
def test_per_sequence_odd_lengths_and_empty_middle(fp_split):
    # lengths 1, 7, 97 in one batch, a zero-length middle in the middle row, a sink shorter than its capacity
    lens = [(4, 97, 7), (1, 0, 7), (0, 7, 1), (4, 1, 97)]
    kw = make_inputs(B=4, Hkv=1, r=3, NQ=1, D=64, S=4, n_quant=0, n_window=0, k_bits=2, v_bits=4, k_group=64,
                     v_group=32, dtype=torch.float16, q_noncontig=True, lens=lens, seed=11)
    check_against_reference(kw, block_n=16, fp_split=fp_split)


@pytest.mark.parametrize("fp_split", [False, True])
@pytest.mark.parametrize("lens", [
    [(0, 300, 5), (0, 0, 0), (0, 7, 1), (2, 1, 0)],  # one long row takes most programs: > SPLITS_P2 slots to merge
    [(3, 97, 7), (1, 0, 7), (0, 150, 1), (4, 1, 9)],
    [(3, 10**6, 99), (2, 61, 5), (0, 0, 0), (1, 31, 2)],  # past the capacities: clamped as the fixed split does
])
def test_balanced_ragged_rows(lens, fp_split):
    # the balanced split (a head's programs shared out by work) against the reference and the fixed split
    past = any(n > 300 for _, n, _ in lens)
    kw = make_inputs(B=4, Hkv=1, r=4, NQ=1, D=64, S=4, n_quant=300, n_window=7, k_bits=2, v_bits=2, k_group=64,
                     v_group=64, dtype=torch.float16, lens=[(min(s, 4), min(n, 300), min(w, 7)) for s, n, w in lens],
                     seed=12)
    if past:  # capacities from the clamped rows, then the lengths past them (the kernel clamps on the device)
        kw["lengths"] = torch.tensor(lens, device=DEVICE)
    for splits in (8, 3):
        tuning = dict(block_n=16, num_splits=splits, fp_split=fp_split)
        if not past:
            check_against_reference(kw, balance=True, **tuning)
        a = da.decode_attention(**kw, balance=True, **tuning)
        b = da.decode_attention(**kw, balance=False, **tuning)
        torch.testing.assert_close(a[0].float(), b[0].float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fp_split", [False, True])
@pytest.mark.parametrize("v_lag", [None, 3])
def test_window_ring_rows(fp_split, v_lag):
    # PackedKV's windows are rings: window token j at row (n_quant + j) % W. n_quant = 29 with W = 8 rotates the
    # rows by 5, so a kernel that reads row j fails; V ahead of K (KIVI) rotates V's window by its own n_quant
    lens = [(2, 29, 6), (0, 13, 5)]
    kw = make_inputs(B=2, Hkv=1, r=4, NQ=2, D=64, S=2, n_quant=29, n_window=6, k_bits=2, v_bits=2, k_group=64,
                     v_group=64, dtype=torch.float16, lens=lens, v_lag=None if v_lag is None else [v_lag] * 2,
                     seed=21)
    ref = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    plain, _ = decode_attention_reference(**ref)
    ring, _ = decode_attention_reference(**ref, window_ring=True)
    assert (plain - ring).abs().max() > 1e-2  # the case does rotate
    for num_splits in (1, 3):
        check_against_reference(kw, window_ring=True, block_n=16, fp_split=fp_split, num_splits=num_splits)


def test_lengths_tensor_forms_and_host_ints_agree():
    # the [3] form, the [B, 3] form with equal rows and the host-int API give the same result
    base = dict(B=2, Hkv=1, r=4, NQ=2, D=64, S=3, n_quant=33, n_window=5, k_bits=2, v_bits=2, k_group=64,
                v_group=64, dtype=torch.float16, seed=4, cap_extra=0, win_extra=0)
    host = make_inputs(**base)
    dev = make_inputs(**base, lens=[(3, 33, 5)] * 2)
    dev3 = make_inputs(**base, lens=[(3, 33, 5)] * 2, lens_form="3")
    assert dev3["lengths"].shape == (3,) and dev["lengths"].shape == (2, 3)
    o_h, l_h = da.decode_attention(**host, block_n=16)
    for kw in (dev, dev3):
        o_d, l_d = da.decode_attention(**kw, block_n=16)
        torch.testing.assert_close(o_d.float(), o_h.float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(l_d, l_h, rtol=1e-4, atol=1e-4)


def test_rows_that_see_nothing():
    # an empty sequence and one shorter than its new tokens: out 0 and lse -inf for rows with no token
    lens = [(0, 0, 0), (0, 0, 1), (2, 7, 3)]
    kw = make_inputs(B=3, Hkv=1, r=2, NQ=2, D=64, S=2, n_quant=0, n_window=0, k_bits=2, v_bits=2, k_group=64,
                     v_group=64, dtype=torch.bfloat16, lens=lens, seed=5)
    for tuning in (dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3), dict(block_n=16, fp_split=True)):
        check_against_reference(kw, **tuning)
    out, lse = da.decode_attention(**kw, block_n=16)
    assert torch.isinf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isinf(lse[1, :, 0]).all() and torch.isfinite(lse[1, :, 1]).all()


def test_lengths_past_capacity_are_clamped():
    # the kernel cannot raise on device values: it clamps to the capacities (never reads out of bounds)
    kw = make_inputs(B=1, Hkv=1, r=4, NQ=1, D=64, S=2, n_quant=16, n_window=4, k_bits=2, v_bits=2, k_group=64,
                     v_group=64, dtype=torch.float16, lens=[(2, 16, 4)], cap_extra=0, win_extra=0, seed=6)
    want, _ = da.decode_attention(**kw, block_n=16)
    kw["lengths"] = torch.tensor([[9, 10**6, 99]], device=DEVICE)
    got, _ = da.decode_attention(**kw, block_n=16)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"n_sink=9 outside \[0, 2\]"):
        decode_attention_reference(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})


# --------------------------------------------------------------- per-channel keys (KIVI, k_axis="channel")
# scale / zero [B, H, cap // G, D]; each tile lies in one token group: q' = q * s_g, plus q . z_g per row.

@st.composite
def channel_configs(draw):
    cfg, tuning = draw(configs())
    g = draw(st.sampled_from([16, 32, 64] if not ON_GPU else [16, 32, 64, 128]))
    cfg.update(k_axis="channel", k_group=g, n_quant=draw(st.sampled_from([g, 2 * g, 97] + ([4096] if ON_GPU else []))),
               NQ=draw(st.sampled_from([1, 1, 2, 3])))
    if cfg["S"] + cfg["n_quant"] + cfg["n_window"] < cfg["NQ"]:
        cfg["n_window"] = 7
    bns = [b for b in ([16, 32] if not ON_GPU else [16, 32, 64]) if g % b == 0]
    tuning.update(block_n=draw(st.sampled_from([None] + bns)), fill_rows=draw(st.sampled_from([None, True])),
                  fp_split=draw(st.sampled_from([None, False, True])),
                  # the key tile dequantized per plane (default), or q scaled per tile: that older form rounds
                  # q * s to bf16 for bf16 models (lse off by 0.17 at amp 3), so it is drawn with fp16 only
                  kchan_dequant=draw(st.sampled_from([None, True] + ([False] if cfg["dtype"] == torch.float16
                                                                     else []))))
    if draw(st.booleans()):  # V quantized further than K (KIVI's per-token V flushes every token)
        n_w = cfg["n_window"]
        cfg["lens"] = [(cfg["S"], cfg["n_quant"], n_w)] * cfg["B"]  # one row per sequence
        cfg["v_lag"] = [draw(st.integers(0, n_w)) for _ in range(cfg["B"])]
    tuning["window_ring"] = draw(st.booleans())
    return cfg, tuning


@settings(deadline=None, max_examples=30 if ON_GPU else 14, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(channel_configs())
def test_channel_keys_match_reference(case):
    cfg, tuning = case
    check_against_reference(make_inputs(**cfg), **tuning)


@pytest.mark.parametrize("r", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kivi_layout_gqa_ratios(r, dtype):
    # KIVI's layout: per-channel 2-bit K in groups of 32 tokens, per-token 2-bit V in groups of 32 channels,
    # a full-precision residual in which K lags V by < 32 tokens, per-sequence lengths, D = 128
    g = 32
    lens = [(0, 2 * g, 40), (0, g, 33)] if not ON_GPU else [(0, 64 * g, 140), (0, 7 * g, 159), (0, 0, 97)]
    lag = [8, 31] if not ON_GPU else [12, 31, 0]
    kw = make_inputs(B=len(lens), Hkv=2 if ON_GPU else 1, r=r, NQ=1, D=128, S=0, n_quant=0, n_window=0, k_bits=2,
                     v_bits=2, k_group=g, v_group=32, dtype=dtype, q_noncontig=True, k_axis="channel", lens=lens,
                     v_lag=lag, seed=r)
    check_against_reference(kw)


def test_channel_keys_group_boundaries_inside_splits():
    # splits and the sink put the middle's split boundaries mid-group: tiles stay group-aligned (masked)
    kw = make_inputs(B=1, Hkv=1, r=4, NQ=1, D=64, S=3, n_quant=96, n_window=5, k_bits=4, v_bits=2, k_group=32,
                     v_group=64, dtype=torch.float16, k_axis="channel", seed=9)
    for tuning in (dict(block_n=16, num_splits=5, fp_split=False), dict(block_n=32, num_splits=4, fp_split=True)):
        check_against_reference(kw, **tuning)


@pytest.mark.parametrize("mutate,match", [
    (lambda kw: kw.update(lengths=torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)), "lengths shape"),
    (lambda kw: kw.update(lengths=torch.zeros(3, device=DEVICE)), "lengths dtype"),
    (lambda kw: kw.update(n_quant=5), "either lengths"),
    (lambda kw: kw.update(v_lengths=kw["lengths"].clone()[None].expand(3, 3)), "v_lengths shape"),
    (lambda kw: kw.update(k_axis="rows"), "k_axis"),
])
def test_lengths_validation_errors(mutate, match):
    kw = make_inputs(B=1, Hkv=1, r=1, NQ=1, D=64, S=0, n_quant=5, n_window=0, k_bits=2, v_bits=2, k_group=64,
                     v_group=64, dtype=torch.float16, lens=[(0, 5, 0)], lens_form="3")
    mutate(kw)
    with pytest.raises(ValueError, match=match):
        da.decode_attention(**kw)


def test_channel_validation_errors():
    kw = make_inputs(B=1, Hkv=1, r=4, NQ=1, D=64, S=0, n_quant=32, n_window=0, k_bits=2, v_bits=2, k_group=32,
                     v_group=64, dtype=torch.float16, k_axis="channel")
    with pytest.raises(ValueError, match="block_n=64 must divide the key token group 32"):
        da.decode_attention(**kw, block_n=64)
    with pytest.raises(ValueError, match="k_scale shape"):
        da.decode_attention(**{**kw, "k_scale": kw["k_scale"][:, :, :0]})
    with pytest.raises(ValueError, match="token group k_group_size=48"):
        da.decode_attention(**{**kw, "k_group_size": 48})


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("k_axis", ["token", "channel"])
def test_device_lengths_no_host_sync_and_cuda_graph(k_axis):
    # the launcher with device lengths never synchronises (sync debug mode raises on a sync), and a
    # captured decode step replays correctly after the lengths change in place
    g = 32 if k_axis == "channel" else 128
    lens = [(4, 4096, 100), (4, 1024, 7), (0, 0, 1)]
    kw = make_inputs(B=3, Hkv=8, r=4, NQ=1, D=128, S=4, n_quant=0, n_window=0, k_bits=2, v_bits=2, k_group=g,
                     v_group=128, dtype=torch.float16, k_axis=k_axis, lens=lens, cap_extra=60, win_extra=28, seed=2)
    da.decode_attention(**kw)  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        da.decode_attention(**kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        da.decode_attention(**kw)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out, lse = da.decode_attention(**kw)
    for new in ([(4, 4100, 110), (4, 64, 3), (1, 7, 0)], [(0, 0, 0), (4, 2048, 128), (4, 4150, 128)]):
        kw["lengths"].copy_(torch.tensor(new))
        graph.replay()
        ref_out, ref_lse = decode_attention_reference(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse.cpu()), seen)
        rel = ((out.float().cpu() - ref_out).norm() / ref_out.norm()).item()
        assert rel < 3e-3, rel
        assert (lse.cpu()[seen] - ref_lse[seen]).abs().max().item() < 5e-3


@pytest.mark.parametrize("scheme", ["kivi", "token_perm", "int8", "fp8", "k8v2", "nqkv"])
def test_ops_fused_path_reads_counts_on_device(scheme, monkeypatch):
    # kvcompile.ops._fused_cuda on real PackedKV caches (under the interpreter on CPU): the lengths go to
    # the kernel as the counts tensors (K and V separately for KIVI, whose V middle runs ahead of K's)
    from kvcompile import ops
    from kvcompile.cache.packed import PackedKV
    from kvcompile.schemes.base import TensorQuant

    monkeypatch.setenv("KVCOMPILE_FUSED", "always")
    torch.manual_seed(0)
    b, hkv, r, d, dtype = 2, 1, 4, 64, torch.float16
    if scheme == "kivi":
        kq, vq, n_sink, window, length = (TensorQuant("affine", 2, 16, "channel"), TensorQuant("affine", 2, 32, "token"),
                                          0, 16, 75)
    elif scheme in ("int8", "fp8"):  # 8-bit codes, one absmax scale per token, no zero (the int8 / fp8 schemes)
        kq, vq, n_sink, window, length = TensorQuant(scheme, 8), TensorQuant(scheme, 8), 0, 0, 61
    elif scheme == "nqkv":  # NF4 codebook codes in groups of 32 channels (group fill), sink and window
        kq, vq, n_sink, window, length = TensorQuant("nf", 4, 32, "token"), TensorQuant("nf", 4, 32, "token"), 4, 8, 61
    elif scheme == "k8v2":  # affine 8-bit keys, 2-bit values with sink and window
        kq, vq, n_sink, window, length = (TensorQuant("affine", 8, None, "token"), TensorQuant("affine", 2, None, "token"),
                                          4, 8, 61)
    else:
        kq, vq, n_sink, window, length = (TensorQuant("affine", 2, 32, "token", permute=True),
                                          TensorQuant("affine", 4, 64, "token", permute=True), 4, 8, 61)
    k = PackedKV.empty(b, hkv, d, kq, capacity=128, n_sink=n_sink, window=window, dtype=dtype, device=DEVICE)
    v = PackedKV.empty(b, hkv, d, vq, capacity=128, n_sink=n_sink, window=window, dtype=dtype, device=DEVICE)
    for n in (length - 1, 1):  # a prefill, then one decode token
        k.append(torch.randn(b, hkv, n, d, dtype=dtype, device=DEVICE))
        v.append(torch.randn(b, hkv, n, d, dtype=dtype, device=DEVICE))
    if scheme == "kivi":
        assert k.lengths() != v.lengths()  # K keeps 16..31 in its window, V 16
    q = torch.randn(b, hkv * r, 1, d, dtype=dtype, device=DEVICE)
    assert ops._fused_unsupported(q, k, v, None, True) is None
    k._host = v._host = None  # as inside the op: nothing known on the host
    fused = ops._fused_cuda(q, k, v, 0.125, None, True)
    assert k._host is None and v._host is None  # the counts were never read back to the host
    ref = ops.attention_reference(q, k.dequantize(torch.float32), v.dequantize(torch.float32), 0.125, None, True)
    rel = ((fused.float() - ref).norm() / ref.norm()).item()
    assert rel < 5e-3, rel


def test_ops_nf4_needs_group_fill():
    # the op's check mirrors the launcher's: NF4 groups below D only through group fill
    from kvcompile import ops
    from kvcompile.cache.packed import PackedKV
    from kvcompile.schemes.base import TensorQuant

    def pk(q):
        return PackedKV.empty(1, 2, 128, q, capacity=64, dtype=torch.float16, device=DEVICE)

    q = torch.zeros(1, 8, 1, 128, dtype=torch.float16, device=DEVICE)
    nf64, nf32 = TensorQuant("nf", 4, 64, "token"), TensorQuant("nf", 4, 32, "token")
    assert ops._fused_unsupported(q, pk(nf64), pk(nf64), None, True) is None
    assert ops._fused_unsupported(q, pk(TensorQuant("affine", 2, None, "token")), pk(nf32), None, True) is None
    assert "group fill" in ops._fused_unsupported(q, pk(nf64), pk(TensorQuant("affine", 2, 32, "token")), None, True)
    q16 = torch.zeros(1, 64, 1, 128, dtype=torch.float16, device=DEVICE)  # 32 rows x 4 groups > 64
    assert "group fill" in ops._fused_unsupported(q16, pk(nf32), pk(nf32), None, True)
    assert "NF2" in ops._fused_unsupported(q, pk(TensorQuant("nf", 2, 64, "token")), pk(nf64), None, True)


def test_ops_takes_the_fused_kernel_for_short_caches(monkeypatch):
    # the op's only alternative is dequantize + SDPA, slower at every length (benchmarks/bench_eager.py): the
    # fused kernel runs wherever supported, a 20-token cache too, without a host sync; KVCOMPILE_FUSED=never
    # forces the fallback
    from kvcompile import ops
    from kvcompile.cache.packed import PackedKV
    from kvcompile.schemes.base import TensorQuant

    monkeypatch.delenv("KVCOMPILE_FUSED", raising=False)
    tq = TensorQuant("affine", 2, None, "token")
    k, v = (PackedKV.empty(1, 2, 64, tq, capacity=32, n_sink=2, window=4, dtype=torch.float16, device=DEVICE)
            for _ in "kv")
    for p in (k, v):
        p.append(torch.randn(1, 2, 20, 64, dtype=torch.float16, device=DEVICE))
        p._host = None
    q = torch.randn(1, 8, 1, 64, dtype=torch.float16, device=DEVICE)
    out = ops._fused_cuda(q, k, v, 0.125, None, True)
    assert out is not None and k._host is None
    ref = ops.attention_reference(q, k.dequantize(torch.float32), v.dequantize(torch.float32), 0.125, None, True)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-3
    monkeypatch.setenv("KVCOMPILE_FUSED", "never")
    assert ops._fused_cuda(q, k, v, 0.125, None, True) is None

def test_layouts_take_their_fast_variants():
    # the launcher picks group fill (per-token groups below D, scales broadcast per group) and the per-tile key
    # dequantization (KIVI) by default; a regression here would fall back silently to the slow forms
    from kvcompile.kernels import sass_probe

    want = {
        "gqa4": dict(GFILL=1, K_GF=False, V_GF=False, M_PAD=16, PREFETCH=True, LAZY=True, V_DEN=True),
        "vg32": dict(GFILL=4, K_GF=False, V_GF=True, GF_BCAST=True, M_PAD=16, SUB=1, PREFETCH=True),
        "g32k4": dict(GFILL=4, K_GF=True, V_GF=True, GF_BCAST=True, M_PAD=16, PREFETCH=True),
        "kivi": dict(GFILL=4, K_GF=False, V_GF=True, K_CHANNEL=True, KC_DEQ=True, M_PAD=16, PREFETCH=True),
        "mha": dict(GFILL=1, SUB=8, PREFETCH=False, V_DEN=True),  # row fill: score-domain tiles, loads in the tile
    }
    for case, flags in want.items():
        _, got = sass_probe.record_launch(case)
        assert {k: got["kwargs"][k] for k in flags} == flags, case
    _, got = sass_probe.record_launch("vg32", group_fill=False)
    assert got["kwargs"]["GFILL"] == 1
    _, got = sass_probe.record_launch("int8")  # four warps: the lazy rescale's row test would cross warps
    assert got["kwargs"]["num_warps"] == 4 and got["kwargs"]["LAZY"] is False
    _, got = sass_probe.record_launch("win")  # sink / window tiles of 16 tokens, loaded contiguously (v24)
    assert got["kwargs"]["FP_BN"] == 16 and got["kwargs"]["FP_CONTIG"] is True
    _, got = sass_probe.record_launch("mha")  # row fill keeps the packed loop's tile there
    assert got["kwargs"]["FP_BN"] == got["kwargs"]["BLOCK_N"] and got["kwargs"]["FP_CONTIG"] is False
    _, got = sass_probe.record_launch("kivi_op")  # KIVI as the op launches it: V ahead of K takes them too (v25)
    assert got["kwargs"]["KV_MIXED"] and got["kwargs"]["WRING"] and got["kwargs"]["DEV_LENS"] and got["kwargs"]["V_DEN"]
    assert got["kwargs"]["FP_BN"] == 16 and got["kwargs"]["FP_CONTIG"] is True


@pytest.mark.parametrize("k", [("int8", 8), ("fp8", 8), ("nf", 4)])
@pytest.mark.parametrize("v_bits", [2, 4])
@pytest.mark.parametrize("meta", [torch.float32, torch.bfloat16])
def test_bf16_values_beside_fp16_coded_keys(k, v_bits, meta):
    # V's planes take bf16's own magic number beside fp16-coded keys (they took K's fp16 one and gave inf outputs)
    kw = bf16_coded_key_inputs(k[0], k[1], v_bits, meta)
    check_against_reference(kw)

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
from kvcompile.quant import pack_codes, quantize_affine  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------------------- inputs


def quantize_packed(x: torch.Tensor, bits: int, g: int):
    codes, scale, zero = quantize_affine(x, bits, g, axis="token")
    return pack_codes(codes, bits), scale, zero


def make_inputs(*, B, Hkv, r, NQ, D, S, n_quant, n_window, k_bits, v_bits, k_group, v_group, dtype,
                cap_extra=3, win_extra=2, amp=1.0, q_noncontig=False, seed=0, device=DEVICE):
    """Random (not zero) inputs; capacity-sized middle and window with garbage past the valid tokens."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * amp

    Hq = Hkv * r
    if q_noncontig:
        q = randn(B, NQ, Hq, D).to(dtype).transpose(1, 2)  # [B, Hq, NQ, D], non-contiguous
    else:
        q = randn(B, Hq, NQ, D).to(dtype)
    kw = {"q": q}
    cap, W = n_quant + cap_extra, n_window + win_extra
    for name, bits, g in (("k", k_bits, k_group), ("v", v_bits, v_group)):
        kw[f"{name}_sink"] = randn(B, Hkv, S, D).to(dtype)
        x = randn(B, Hkv, cap, D) + randn(B, Hkv, 1, D)  # per-channel offsets, like real keys
        codes, scale, zero = quantize_packed(x, bits, g)
        kw[f"{name}_codes"], kw[f"{name}_scale"], kw[f"{name}_zero"] = codes, scale, zero
        kw[f"{name}_window"] = randn(B, Hkv, W, D).to(dtype)
    kw = {k: v.to(device) for k, v in kw.items()}
    kw.update(n_quant=n_quant, n_window=n_window, k_bits=k_bits, v_bits=v_bits,
              k_group_size=k_group, v_group_size=v_group)
    return kw


TOL = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}  # (out rel. L2, lse abs)


def check_against_reference(kw, **tuning):
    out, lse = da.decode_attention(**kw, **tuning)
    ref_out, ref_lse = decode_attention_reference(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    q = kw["q"]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    out, lse = out.float().cpu(), lse.cpu()
    rel = ((out - ref_out).norm() / ref_out.norm().clamp_min(1e-6)).item()
    lse_err = (lse - ref_lse).abs().max().item()
    tol_out, tol_lse = TOL[q.dtype]
    assert rel < tol_out, f"output relative error {rel:.3e}"
    assert lse_err < tol_lse * max(1.0, ref_lse.abs().max().item() / 8), f"lse error {lse_err:.3e}"


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
        k_group=draw(st.sampled_from([D, D, 32, 64])),
        v_group=draw(st.sampled_from([D, D, 32, 64])),
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
    (lambda kw: kw.update(k_group_size=16), "group"),
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
    )
    return cfg, tuning


@settings(deadline=None, max_examples=60 if ON_GPU else 30, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(variant_configs())
def test_variants_match_reference(case):
    cfg, tuning = case
    check_against_reference(make_inputs(**cfg), **tuning)


@pytest.mark.parametrize("r,NQ", [(1, 1), (3, 1), (4, 1), (8, 1), (1, 3), (4, 3), (2, 2)])
@pytest.mark.parametrize("block_n", [16, 32] if not ON_GPU else [16, 32, 64])
def test_fill_rows_gqa_ratios(r, NQ, block_n):
    # every sub-block shape (SUB = 8, 4, 2), odd lengths so sub-blocks end mid-tile, sink + window + splits
    kw = make_inputs(B=1, Hkv=2, r=r, NQ=NQ, D=64, S=3, n_quant=61, n_window=5, k_bits=2, v_bits=4,
                     k_group=64, v_group=64, dtype=torch.float16, seed=r * 100 + NQ)
    check_against_reference(kw, block_n=block_n, num_splits=3, fill_rows=True, use_dot=True, fp_split=True)


def test_fp_split_only_fp_parts_and_empty_middle():
    # fp_split with no packed tokens falls back to the plain split; with packed tokens the last program
    # takes sink + window
    for n_quant in (0, 1, 40):
        kw = make_inputs(B=1, Hkv=1, r=4, NQ=2, D=64, S=4, n_quant=n_quant, n_window=9, k_bits=2, v_bits=2,
                         k_group=64, v_group=64, dtype=torch.float16, seed=n_quant)
        check_against_reference(kw, block_n=16, fp_split=True, fill_rows=True)

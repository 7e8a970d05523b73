"""Random inputs for the packed-KV attention kernels' tests (decode and chunked prefill): the layout of
``kvcompile.kernels.decode_attention`` / ``prefill_attention`` keyword arguments, built through the reference
quantizers, never zeros, with garbage past the valid tokens."""

import torch

from kvcompile.quant import pack_codes, quantize_affine, quantize_fp8, quantize_int8, quantize_nf

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def quantize_packed(x: torch.Tensor, bits: int, g: int, axis: str = "token", fmt: str = "affine"):
    if fmt == "int8":
        return (*quantize_int8(x), None)
    if fmt == "fp8":
        return (*quantize_fp8(x), None)
    if fmt == "nf":
        codes, scale = quantize_nf(x, bits, g)
        return pack_codes(codes, bits), scale, None
    codes, scale, zero = quantize_affine(x, bits, g, axis=axis)
    return pack_codes(codes, bits), scale, zero


def make_inputs(*, B, Hkv, r, NQ, D, S, n_quant, n_window, k_bits, v_bits, k_group, v_group, dtype,
                cap_extra=3, win_extra=2, amp=1.0, q_noncontig=False, seed=0, device=DEVICE, k_axis="token",
                lens=None, v_lag=None, lens_form="B3", k_format="affine", v_format="affine"):
    """Random (not zero) inputs; capacity-sized middle and window with garbage past the valid tokens.

    lens: per-sequence [(n_sink, n_quant, n_window)] * B, passed as a device ``lengths`` tensor ([B, 3],
    or [3] with lens_form="3" when all rows agree); S / n_quant / n_window then only size the capacities
    (at least the longest row). v_lag: per row, how many tokens of K's window V already holds packed
    (KIVI: V flushes every token, K a token group at a time): passed as ``v_lengths``.
    k_axis="channel": keys quantized per channel over groups of k_group tokens (capacity rounded up).
    k_format / v_format "int8" / "fp8": 8-bit codes with one absmax scale per token (zero None); "nf": NF4
    codebook codes (4 bits) with an absmax scale per group (zero None)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * amp

    Hq = Hkv * r
    if q_noncontig:
        q = randn(B, NQ, Hq, D).to(dtype).transpose(1, 2)  # [B, Hq, NQ, D], non-contiguous
    else:
        q = randn(B, Hq, NQ, D).to(dtype)
    kw = {"q": q}
    if lens is not None:
        S = max([S] + [ls[0] for ls in lens])
        n_quant = max([n_quant] + [ls[1] for ls in lens])
        n_window = max([n_window] + [ls[2] for ls in lens])
    lag = max(v_lag) if v_lag else 0
    cap, W = n_quant + cap_extra, n_window + win_extra
    for name, bits, g, fmt in (("k", k_bits, k_group, k_format), ("v", v_bits, v_group, v_format)):
        axis = k_axis if name == "k" else "token"
        c = cap + (lag if name == "v" else 0)
        if axis == "channel":
            c = -(-c // g) * g
        kw[f"{name}_sink"] = randn(B, Hkv, S, D).to(dtype)
        x = randn(B, Hkv, c, D) + randn(B, Hkv, 1, D)  # per-channel offsets, like real keys
        codes, scale, zero = quantize_packed(x, bits, g, axis, fmt)
        kw[f"{name}_codes"], kw[f"{name}_scale"], kw[f"{name}_zero"] = codes, scale, zero
        kw[f"{name}_window"] = randn(B, Hkv, W, D).to(dtype)
    if lens is not None:
        t = torch.tensor(lens, dtype=torch.int64 if seed % 2 else torch.int32)
        kw["lengths"] = t[0] if lens_form == "3" else t
        if v_lag is not None:
            kw["v_lengths"] = torch.tensor([(ls[0], ls[1] + d, ls[2] - d) for ls, d in zip(lens, v_lag)])
    kw = {k: (None if v is None else v.to(device)) for k, v in kw.items()}
    if lens is None:
        kw.update(n_quant=n_quant, n_window=n_window)
    kw.update(k_bits=k_bits, v_bits=v_bits, k_group_size=k_group, v_group_size=v_group)
    if k_axis != "token":
        kw["k_axis"] = k_axis
    if k_format != "affine":
        kw["k_format"] = k_format
    if v_format != "affine":
        kw["v_format"] = v_format
    return kw


TOL = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}  # (out rel. L2, lse abs)


def with_rope(kw, rotary, permuted, seed):
    """Keys quantized before RoPE: the model's inverse frequencies (rotary_dim of D) and a channel order, on q's
    device (the kernel arguments ``k_rope`` / ``k_perm``)."""
    D, Hkv, dev = kw["q"].shape[-1], kw["k_codes"].shape[1], kw["q"].device
    gen = torch.Generator().manual_seed(seed)
    kw = dict(kw, k_rope=(1.0 / (10000.0 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))).to(dev))
    if permuted:
        kw["k_perm"] = torch.stack([torch.randperm(D, generator=gen) for _ in range(Hkv)]).to(dev)
    return kw


def bf16_coded_key_inputs(k_format, k_bits, v_bits, meta):
    """A bf16 model whose keys are 8-bit / NF4 codes (fp16 planes) and whose values are affine codes in whole-head
    planes with ``meta`` (non-fp16) scales and zeros: the case where V's planes once took K's fp16 magic number
    (both attention kernels' test_bf16_values_beside_fp16_coded_keys)."""
    kw = make_inputs(B=1, Hkv=2, r=2, NQ=3, D=64, S=2, n_quant=20, n_window=4, k_bits=k_bits, v_bits=v_bits,
                     k_group=64, v_group=64, dtype=torch.bfloat16, k_format=k_format, seed=v_bits)
    kw["v_scale"], kw["v_zero"] = kw["v_scale"].to(meta), kw["v_zero"].to(meta)
    return kw

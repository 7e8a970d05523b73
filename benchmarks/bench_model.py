"""Whole-model decode step: a Llama-3-8B-shaped decoder with a full-precision KV cache vs kvcompile's packed cache.

    python benchmarks/bench_model.py [--context 32768] [--batch 1,8] [--steps 20] [--max-batch] [--out DIR]
    python benchmarks/bench_model.py --tiny --out /tmp/bm          # CPU smoke run (references, eager)

The model is random-initialised and written inline, gpt-fast style (plain weight tensors, functional
forward): hidden 4096, 32 layers, 32 query / 8 KV heads of 128, SwiGLU MLP 14336, vocab 128256 (untied
lm_head), RMSNorm, rotate-half RoPE with theta 500000 (no llama3 frequency scaling), bf16. One step decodes
ONE new token per sequence at position L (the context): embedding, 32 x (norm, qkv, RoPE, cache write,
attention, wo, norm, MLP), final norm, lm_head.

Variants (the only difference is the KV cache and the attention over it):

- ``fp``: per layer a static [B, Hkv, L+1, D] K and V buffer (capacity exactly context + the new token),
  the new token written by index at position L, attention ``F.scaled_dot_product_attention(q, K[:, :, :L+1],
  V[:, :, :L+1], enable_gqa=True)`` over the valid prefix (here the whole buffer). No mask, so SDPA can take
  its flash kernel; a mask over a longer buffer would force the memory-efficient or math backend, which is
  why the prefix is the faster fair option. ``--fp-attn mask`` runs that other option (whole buffer + a
  boolean mask) for comparison.
- ``kvc``: per layer two ``PackedKV`` (K, V) from ``PackedKV.empty(..., capacity=L+1)`` (rounded up to whole
  128-byte code lines, ``line_capacity``, as kvcompile's transformers cache allocates it), written with
  ``kvcompile.ops.write_pair`` (one launch for both where their layouts match) and read with ``kvcompile.ops.attention``. Default layout: per-token affine 2-bit K
  and V, groups of 128 channels (= head dim), fp16 scale + zero, 4 full-precision sink tokens and a
  128-token full-precision window (what the fused Triton decode kernel supports today).

The L-token context is not prefilled by running the model: the fp buffers are filled with randn and the
packed storage with random codes / scales / zeros / sink / window (none zero) and its ``counts`` set so
attention reads L valid tokens. Before every timed step the counts are put back to L (a device copy outside
the timed region), so every step of both variants writes the token at position L and attends over L+1 tokens.

``--compile`` runs the non-attention parts (norms, qkv, RoPE, wo, MLP, lm_head) through torch.compile, in both
variants (default off: plain eager ops, so both variants pay the same unfused elementwise kernels).

Timing: ``--warmup`` eager steps, then one whole step captured in a ``torch.cuda.CUDAGraph`` and replayed
``--steps`` times, each replay between CUDA events; the median is reported. If capture fails (a host sync in
the write or attention path, for instance) the error is printed and that variant is timed eagerly (CUDA events
around the eager step, host launch overhead included). Each row says which mode it is. Inside a capture the
kvcompile op always takes the fused kernel where it supports the layout; eagerly it asks
``fused_decode_is_profitable`` unless ``KVCOMPILE_FUSED`` is set, which ``--fused`` (default ``always``) does
here. The path that ran is read from ``torch._dynamo.utils.counters["kvcompile"]`` (fused attention / write
calls per step).

Memory: KV bytes are summed from the cache's real storage tensors (``.nbytes``; ``storage_nbytes()`` for
PackedKV). ``--max-batch`` estimates each variant's largest batch from the free memory after the weights and
the per-sequence cache bytes measured at B=1 (plus the step's measured workspace), then verifies it by
allocating that batch's caches and running a step in the variant's mode (graph or eager); on OOM it backs off,
on success it probes upwards, and reports the largest batch that ran, timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvcompile import ops  # noqa: E402
from kvcompile.cache.packed import PackedKV, line_capacity  # noqa: E402
from kvcompile.quant.pack import levels as _levels  # noqa: E402
from kvcompile.schemes import LayerSpec, TensorQuant, get_scheme  # noqa: E402

GiB = 1 << 30


# ---------------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    inter: int = 14336
    vocab: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0


LLAMA3_8B = ModelConfig()
TINY = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, inter=512, vocab=1000)


class Weights:
    """Random weights of a Llama-shaped decoder (gpt-fast layout: fused wqkv, fused w1|w3)."""

    def __init__(self, cfg: ModelConfig, device, dtype, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)

        def w(*shape, std=0.02):
            return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

        def norm():
            return (1.0 + 0.1 * torch.randn(cfg.dim, device=device, generator=gen)).to(dtype)

        hd, hq, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.emb = w(cfg.vocab, cfg.dim, std=1.0)
        self.layers = [dict(attn_norm=norm(), wqkv=w((hq + 2 * hkv) * hd, cfg.dim), wo=w(cfg.dim, hq * hd),
                            ffn_norm=norm(), w13=w(2 * cfg.inter, cfg.dim), w2=w(cfg.dim, cfg.inter))
                       for _ in range(cfg.n_layers)]
        self.norm = norm()
        self.lm_head = w(cfg.vocab, cfg.dim)
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))

    def tensors(self):
        yield self.emb
        yield self.norm
        yield self.lm_head
        for lw in self.layers:
            yield from lw.values()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors())


def rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_at(inv_freq, pos: int):
    """cos, sin [D] (float32) at one static position, rotate-half convention (transformers, PackedKV.rotate)."""
    f = float(pos) * inv_freq
    emb = torch.cat([f, f])
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def _qkv(x, attn_norm, wqkv, cos, sin, eps: float, hq: int, hkv: int, hd: int):
    b = x.shape[0]
    h = rms_norm(x, attn_norm, eps)
    q, k, v = F.linear(h, wqkv).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
    q = apply_rope(q.reshape(b, hq, 1, hd), cos, sin)
    k = apply_rope(k.reshape(b, hkv, 1, hd), cos, sin)
    return q, k, v.reshape(b, hkv, 1, hd).contiguous()


def _out_mlp(x, o, wo, ffn_norm, w13, w2, eps: float):
    x = x + F.linear(o.reshape(x.shape[0], -1), wo)
    g, u = F.linear(rms_norm(x, ffn_norm, eps), w13).chunk(2, dim=-1)
    return x + F.linear(F.silu(g) * u, w2)


def _head(x, norm, lm_head, eps: float):
    return F.linear(rms_norm(x, norm, eps), lm_head)


EAGER_FNS = (_qkv, _out_mlp, _head)


def compiled_fns():
    """The non-attention parts through torch.compile (``--compile``; fuses norms, RoPE, SiLU into few kernels,
    as gpt-fast does); the cache write + attention stay outside, the same code in both variants."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):  # one compile per batch size; --max-batch tries many
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(64, getattr(dcfg, name)))
    return tuple(torch.compile(f, dynamic=False, fullgraph=True) for f in EAGER_FNS)


def decode_step(cfg: ModelConfig, W: Weights, tokens, cos, sin, attend, fns=EAGER_FNS):
    """Logits [B, vocab] for one new token per sequence. ``attend(i, q, k, v)`` writes layer i's new k / v
    [B, Hkv, 1, D] into its cache and returns attention of q [B, Hq, 1, D] over the cache."""
    qkv, out_mlp, head = fns
    eps = cfg.norm_eps
    x = F.embedding(tokens, W.emb)  # [B, dim]
    for i, lw in enumerate(W.layers):
        q, k, v = qkv(x, lw["attn_norm"], lw["wqkv"], cos, sin, eps, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        o = attend(i, q, k, v)
        x = out_mlp(x, o, lw["wo"], lw["ffn_norm"], lw["w13"], lw["w2"], eps)
    return head(x, W.norm, W.lm_head, eps)


# ---------------------------------------------------------------------------------------------- the caches

class FPCache:
    """Static full-precision K / V per layer [B, Hkv, L+1, D], written by index at position L."""

    name = "fp"

    def __init__(self, cfg: ModelConfig, batch: int, context: int, dtype, device, fp_attn: str = "prefix",
                 gen=None, data=None):
        cap = context + 1
        self.pos, self.fp_attn, self.scale = context, fp_attn, 1.0 / math.sqrt(cfg.head_dim)
        shape = (batch, cfg.n_kv_heads, cap, cfg.head_dim)
        self.k, self.v = [], []
        for i in range(cfg.n_layers):
            for lst, j in ((self.k, 0), (self.v, 1)):
                t = torch.empty(shape, device=device, dtype=dtype)
                if data is not None:  # [L] of (k, v) [B, Hkv, L, D]: the same tokens the packed cache holds
                    t[:, :, :context] = data[i][j]
                    t[:, :, context:].normal_(generator=gen)
                else:
                    t.normal_(generator=gen)
                lst.append(t)
        self.mask = None
        if fp_attn == "mask":  # whole buffer + a boolean mask of the valid tokens (all of them here)
            self.mask = torch.ones(1, 1, 1, cap, dtype=torch.bool, device=device)

    def attend(self, i, q, k, v):
        p = self.pos
        self.k[i][:, :, p : p + 1].copy_(k)
        self.v[i][:, :, p : p + 1].copy_(v)
        if self.fp_attn == "mask":
            return F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=self.mask, scale=self.scale,
                                                  enable_gqa=True)
        return F.scaled_dot_product_attention(q, self.k[i][:, :, : p + 1], self.v[i][:, :, : p + 1],
                                              scale=self.scale, enable_gqa=True)

    def reset(self):
        pass  # position L is overwritten by every step

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v) + (0 if self.mask is None else self.mask.nbytes)

    def per_seq_nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v) // self.k[0].shape[0]

    def describe(self) -> str:
        how = "valid prefix, no mask" if self.fp_attn == "prefix" else "whole buffer + bool mask"
        return f"static {self.k[0].dtype} K/V [B, Hkv, L+1, D] per layer, SDPA enable_gqa ({how})"


def _counts_for(pk: PackedKV, context: int) -> tuple[int, int, int]:
    """(n_sink, n_quant, n_window) of a cache that has taken ``context`` tokens one at a time."""
    n_s = min(pk.n_sink, context)
    rest = context - n_s
    flush = pk.quant.flush
    n_q = max(0, (rest - pk.window_size) // flush * flush)
    return n_s, n_q, rest - n_q


def fill_random(pk: PackedKV, context: int, gen=None) -> None:
    """Random (never zero) storage with the statistics of quantized randn-like K/V, written in place; counts
    set so that attention reads ``context`` tokens."""
    q = pk.quant
    if q.kind == "affine":
        top = _levels(q.bits)
        pk.codes.random_(0, 243 if q.bits == 1.5 else 256, generator=gen)  # 1.5: 5 trits per byte, < 3**5
        pk.scale.uniform_(4.0 / top, 6.0 / top, generator=gen)  # a group's range of ~4-6 (randn-like)
        pk.zero.uniform_(-3.0, -2.0, generator=gen)
    elif q.kind == "nf":
        pk.codes.random_(0, 256, generator=gen)
        pk.scale.uniform_(2.0, 3.0, generator=gen)
    elif q.kind == "int8":
        pk.codes.random_(0, 256, generator=gen)
        pk.scale.uniform_(2.5 / 127, 3.5 / 127, generator=gen)
    else:  # fp8: random bytes include NaN codes; write randn row by row instead
        f8 = pk.codes.view(torch.float8_e4m3fn)
        for b in range(f8.shape[0]):
            f8[b].copy_(torch.randn(f8[b].shape, device=f8.device, dtype=torch.bfloat16, generator=gen))
        pk.scale.fill_(1.0)
    pk.sink.normal_(generator=gen)
    pk.window.normal_(generator=gen)
    pk._set_counts(*_counts_for(pk, context))


class PackedCache:
    """Per layer two PackedKV (K, V), written with ``kvcompile.ops.write_pair`` (one launch for both where their
    layouts match), read with ``kvcompile.ops.attention``."""

    name = "kvc"

    def __init__(self, cfg: ModelConfig, batch: int, context: int, spec: LayerSpec, dtype, device,
                 meta_dtype="float16", inv_freq=None, gen=None, data=None):
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.spec = spec
        self.k, self.v = [], []
        # (the capacity as kvcompile's transformers cache rounds it: whole code lines, which the TMA ring reads)
        cap = line_capacity(context + 1, spec.n_sink, (spec.k, cfg.head_dim), (spec.v, cfg.head_dim))
        common = dict(capacity=cap, n_sink=spec.n_sink, window=spec.window, dtype=dtype, device=device,
                      meta_dtype=meta_dtype)
        for i in range(cfg.n_layers):
            kp = PackedKV.empty(batch, cfg.n_kv_heads, cfg.head_dim, spec.k,
                                rope_inv_freq=inv_freq if spec.k_pre_rope else None, **common)
            vp = PackedKV.empty(batch, cfg.n_kv_heads, cfg.head_dim, spec.v, **common)
            if data is not None:  # quantize the given full-precision tokens through the write op
                ops.write(kp, data[i][0])
                ops.write(vp, data[i][1])
                kp.lengths(), vp.lengths()  # host mirror of counts (one sync, at setup)
            else:
                fill_random(kp, context, gen)
                fill_random(vp, context, gen)
            self.k.append(kp)
            self.v.append(vp)
        self._base = [(p, p.counts.clone(), list(p.lengths())) for p in self.k + self.v]

    def attend(self, i, q, k, v):
        ops.write_pair(self.k[i], k, self.v[i], v)  # one write launch for K and V where their layouts match
        return ops.attention(q, self.k[i], self.v[i], scale=self.scale)

    def reset(self):
        """Back to ``context`` valid tokens (device copies; the host mirror too, so writes need no sync)."""
        for p, base, host in self._base:
            p.counts.copy_(base)
            p._host = list(host)

    def nbytes(self) -> int:
        return sum(p.storage_nbytes() for p in self.k + self.v)

    def per_seq_nbytes(self) -> int:
        b = self.k[0].shape[0]
        return sum(t.nbytes for p in self.k + self.v for t in (p.codes, p.scale, p.zero, p.sink, p.window)
                   if t is not None) // b

    def describe(self) -> str:
        return "PackedKV K/V per layer (capacity L+1), kvcompile.ops.write_pair + kvcompile.ops.attention"


# ---------------------------------------------------------------------------------------------- schemes

def parse_kv(s: str) -> dict:
    out = {}
    for item in filter(None, (s or "").split(",")):
        k, _, v = item.partition("=")
        v = v.strip()
        if v.lower() in ("true", "false"):
            out[k.strip()] = v.lower() == "true"
        else:
            try:
                out[k.strip()] = int(v)
            except ValueError:
                try:
                    out[k.strip()] = float(v)
                except ValueError:
                    out[k.strip()] = v
    return out


def build_spec(args, cfg: ModelConfig) -> tuple[LayerSpec, str, str]:
    """(LayerSpec, description, meta dtype name)."""
    if args.scheme == "affine":
        g = min(args.group, cfg.head_dim)
        k = TensorQuant("affine", args.k_bits, g, "token")
        v = TensorQuant("affine", args.v_bits, g, "token")
        spec = LayerSpec(k=k, v=v, n_sink=args.sink, window=args.window)
        desc = (f"per-token affine K{_fmt_bits(args.k_bits)}V{_fmt_bits(args.v_bits)}, groups of {g} channels, "
                f"{args.meta_dtype} scale+zero, {args.sink} sink + {args.window} window tokens in full precision")
        return spec, desc, args.meta_dtype
    scheme = get_scheme(args.scheme, **parse_kv(args.scheme_args))
    spec = scheme.layer_spec(0, cfg.n_layers)
    return spec, scheme.describe(), getattr(scheme, "meta_dtype", "float16")


def _fmt_bits(b):
    return str(int(b)) if b == int(b) else str(b)


# ---------------------------------------------------------------------------------------------- running

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters["kvcompile"])


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before) if after.get(k, 0) != before.get(k, 0)}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class Bench:
    """Shared state: config, weights, scheme; builds one variant's caches at a time."""

    def __init__(self, args, cfg: ModelConfig, device, dtype):
        self.args, self.cfg, self.device, self.dtype = args, cfg, device, dtype
        self.W = Weights(cfg, device, dtype, seed=args.seed)
        self.spec, self.scheme_desc, self.meta_dtype = build_spec(args, cfg)
        self.cos, self.sin = rope_at(self.W.inv_freq, args.context)
        self.fns = compiled_fns() if getattr(args, "compile", False) else EAGER_FNS
        self.graph_error = {}  # variant -> capture error (then eager for that variant)

    def make_cache(self, variant: str, batch: int, gen=None, data=None):
        a = self.args
        if variant == "fp":
            return FPCache(self.cfg, batch, a.context, self.dtype, self.device, fp_attn=a.fp_attn, gen=gen, data=data)
        return PackedCache(self.cfg, batch, a.context, self.spec, self.dtype, self.device, meta_dtype=self.meta_dtype,
                           inv_freq=self.W.inv_freq, gen=gen, data=data)

    def step_fn(self, cache, tokens):
        return lambda: decode_step(self.cfg, self.W, tokens, self.cos, self.sin, cache.attend, self.fns)

    def run(self, variant: str, batch: int, steps: int, probe_only: bool = False) -> dict:
        """Build the caches at ``batch``, warm up, capture (CUDA) or not, time ``steps`` steps. Raises on OOM
        (the caller frees and backs off). Returns the row."""
        a, dev = self.args, self.device
        gen = torch.Generator(device=dev).manual_seed(a.seed + batch)
        cache = tokens = step = g = out = None
        try:
            cache = self.make_cache(variant, batch, gen=gen)
            tokens = torch.randint(0, self.cfg.vocab, (batch,), device=dev, generator=gen)
            step = self.step_fn(cache, tokens)
            row = dict(variant=variant, batch=batch, context=a.context, kv_bytes=cache.nbytes(),
                       kv_bytes_per_seq=cache.per_seq_nbytes())
            # eager warm-up (compiles the Triton kernels; counts which path the ops took)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            c0 = _counters()
            cache.reset()
            out = step()
            _sync(dev)
            row["eager_counters_per_step"] = _delta(_counters(), c0)
            if dev.type == "cuda":
                row["step_workspace_bytes"] = torch.cuda.max_memory_allocated() - base_mem
            for _ in range(max(0, a.warmup - 1)):
                cache.reset()
                out = step()
            _sync(dev)
            mode = "eager"
            if dev.type == "cuda" and not a.no_graph and variant not in self.graph_error:
                failed = False
                try:
                    g, out_g, cap_counts = self._capture(cache, step)
                    out, mode = out_g, "graph"
                    row["capture_counters"] = cap_counts
                except Exception as e:  # noqa: BLE001
                    if _is_oom(e):
                        raise
                    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    self.graph_error[variant] = msg
                    print(f"[{variant}] CUDA graph capture failed, timing eagerly instead: {msg}", flush=True)
                    if a.verbose:
                        traceback.print_exc()
                    g, failed = None, True
                if failed:
                    _free(dev)  # after the except block: its traceback held the half-captured graph
            row["mode"] = mode
            if mode == "eager" and variant in self.graph_error:
                row["capture_error"] = self.graph_error[variant]
            times = self._time(cache, step, g, 1 if probe_only else steps)
            row["step_ms"] = times[len(times) // 2]
            row["step_ms_all"] = times
            row["tokens_per_s"] = batch / (row["step_ms"] * 1e-3)
            row["logits_finite"] = bool(torch.isfinite(out).all())
            row["path"] = self._path(variant, row)
            if dev.type == "cuda":
                row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            return row
        finally:
            del g, out, step, tokens, cache
            _free(dev)

    def _capture(self, cache, step):
        """Side-stream warm-up, then one whole decode step captured in a CUDA graph, replayed once. Returns
        (graph, its static logits, the kvcompile counters the capture incremented)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        # Inside a capture the kvcompile op takes the fused kernel whenever it supports the layout (auto policy);
        # warm it up with the same choice so that no Triton kernel compiles / loads for the first time in capture.
        policy = os.environ.get("KVCOMPILE_FUSED", "auto")
        if policy == "auto":
            os.environ["KVCOMPILE_FUSED"] = "always"
        try:
            with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs recommends
                for _ in range(2):
                    cache.reset()
                    step()
        finally:
            os.environ["KVCOMPILE_FUSED"] = policy
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        cache.reset()
        c1 = _counters()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step()
        cap = _delta(_counters(), c1)
        cache.reset()
        g.replay()
        torch.cuda.synchronize()
        return g, out, cap

    def _time(self, cache, step, g, n):
        dev = self.device
        times = []
        for _ in range(n):
            cache.reset()
            if dev.type == "cuda":
                st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                st.record()
                g.replay() if g is not None else step()
                en.record()
                en.synchronize()
                times.append(st.elapsed_time(en))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)

    def _path(self, variant, row):
        L = self.cfg.n_layers
        if variant == "fp":
            return "SDPA (" + ("prefix" if self.args.fp_attn == "prefix" else "mask") + ")"
        if self.device.type != "cuda":
            return "CPU references (PackedKV.append + dequantize + float32 attention)"
        c = row.get("capture_counters") if row.get("mode") == "graph" else row.get("eager_counters_per_step")
        c = c or {}
        fa, fw = c.get("fused_attention_calls", 0), c.get("fused_write_calls", 0)
        att = "fused attention kernel" if fa == L else ("dequantize+SDPA" if fa == 0 else f"fused in {fa}/{L} layers")
        wr = "write kernel" if fw == 2 * L else ("reference write" if fw == 0 else f"write kernel {fw}/{2 * L} calls")
        if fw == 2 * L and c.get("fused_write_pair_launches", 0) == L:
            wr = "write kernel (one launch per layer for K and V)"
        where = "counted during capture" if row.get("mode") == "graph" else "counted in one eager step"
        return f"{att}, {wr} ({where})"

    # ------------------------------------------------------------------ max batch
    def max_batch(self, variant: str, ref_row: dict) -> dict:
        """Largest batch whose caches + one step fit: estimate, then verify (back off on OOM, probe upwards on
        success). Every successful attempt is timed; the row of the largest is returned in ``row``."""
        a = self.args
        _free(self.device)
        free, total = torch.cuda.mem_get_info()
        per_seq = ref_row["kv_bytes_per_seq"]
        ws = ref_row.get("step_workspace_bytes", 0) / max(1, ref_row["batch"])
        reserve = int(a.reserve_gib * GiB)
        est = max(1, int((free - reserve) // (per_seq + ws)))
        info = dict(variant=variant, free_bytes_after_weights=free, total_bytes=total, weights_bytes=self.W.nbytes,
                    kv_bytes_per_seq=per_seq, workspace_bytes_per_seq_est=ws, reserve_bytes=reserve, estimate=est,
                    attempts=[])
        print(f"[{variant}] max batch: free {free / GiB:.2f} GiB after weights, {per_seq / GiB:.3f} GiB KV/seq + "
              f"{ws / 2**20:.1f} MiB workspace/seq, reserve {a.reserve_gib} GiB -> estimate B={est}", flush=True)
        ok, bad, best_row = 0, None, None

        def attempt(b):
            nonlocal ok, bad, best_row
            r = None
            try:
                r = self.run(variant, b, a.steps)
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                info["attempts"].append(dict(batch=b, ok=False, error=f"{type(e).__name__}"))
            if r is None:  # freed only here: the exception's traceback held the partial caches
                print(f"[{variant}]   B={b}: out of memory", flush=True)
                bad = b if bad is None else min(bad, b)
                _free(self.device)
                return False
            info["attempts"].append(dict(batch=b, ok=True, mode=r["mode"], step_ms=r["step_ms"]))
            print(f"[{variant}]   B={b}: ok ({r['mode']}, {r['step_ms']:.2f} ms, {r['tokens_per_s']:.0f} tok/s)",
                  flush=True)
            if b > ok:
                ok, best_row = b, r
            return True

        b = est
        tries = 0
        if attempt(b):
            step = max(1, b // 16)
            while tries < a.max_batch_tries and bad is None:
                tries += 1
                if not attempt(ok + step):
                    break
                step *= 2
        else:
            step = max(1, b // 16)
            while tries < a.max_batch_tries and ok == 0:
                tries += 1
                nb = max(1, b - step)
                if attempt(nb):
                    break
                b, step = nb, step * 2
                if nb == 1:
                    break
        while bad is not None and ok and bad - ok > 1 and tries < a.max_batch_tries:  # bisect the gap
            tries += 1
            attempt((ok + bad) // 2)
        info["verified"] = ok
        info["bracket_oom_at"] = bad
        info["row"] = best_row
        return info


# ---------------------------------------------------------------------------------------------- tests' helper

def compare_logits(cfg: ModelConfig, args, device="cpu", dtype=torch.float32, batch=1, seed=0, bench=None) -> dict:
    """One decode step of both variants on the SAME context (the packed cache quantizes the fp cache's tokens
    through ``kvcompile.ops.write``); returns their logits and the relative L2 difference."""
    device = torch.device(device)
    bench = bench or Bench(args, cfg, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, cfg.n_kv_heads, args.context, cfg.head_dim)
    data = [(torch.randn(shape, device=device, dtype=dtype, generator=gen),
             torch.randn(shape, device=device, dtype=dtype, generator=gen)) for _ in range(cfg.n_layers)]
    tokens = torch.randint(0, cfg.vocab, (batch,), device=device, generator=gen)
    out = {}
    for variant in ("fp", "kvc"):
        cache = bench.make_cache(variant, batch, gen=gen, data=data)
        cache.reset()
        out[variant] = bench.step_fn(cache, tokens)().float()
    rel = ((out["kvc"] - out["fp"]).norm() / out["fp"].norm()).item()
    return dict(logits=out, rel_err=rel)


# ---------------------------------------------------------------------------------------------- reporting

def _env(device, argv=None) -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    cmd = sys.argv if argv is None else ["benchmarks/bench_model.py", *argv]
    return dict(device=name, torch=torch.__version__, triton=tv, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join(shlex.quote(x) for x in cmd))


def _gib(n):
    return f"{n / GiB:.2f}"


def _size(n):
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def markdown(meta, rows, maxb) -> str:
    lines = [
        "## Whole-model decode step (`benchmarks/bench_model.py`)", "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; {meta['date']}  ",
        f"Model: {meta['model']}; {meta['model_code']}  ",
        f"Context L = {meta['context']} tokens + 1 new token per sequence per step; weights {meta['weights_size']}.  ",
        f"fp: {meta['fp_desc']}.  ",
        f"kvc: {meta['kvc_desc']}; scheme: {meta['scheme']}; KVCOMPILE_FUSED={meta['fused_policy']}.  ",
        f"Timing: {meta['timing']}.", ""]
    if meta.get("check_logits_rel_err") is not None:
        lines += [f"Check (--check): logits of kvc vs fp on the same context, B=1: relative L2 difference "
                  f"{meta['check_logits_rel_err']:.3e}.", ""]
    lines += [
        "| variant | B | mode | step ms (median) | tokens/s | KV cache (measured) | KV / seq | path | logits finite |",
        "|---|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']}{' (max batch)' if r.get('is_max') else ''} | {r['batch']} | {r['mode']} | "
                     f"{r['step_ms']:.3f} | {r['tokens_per_s']:.1f} | {_size(r['kv_bytes'])} | "
                     f"{_size(r['kv_bytes_per_seq'])} | {r['path']} | {r['logits_finite']} |")
    errs = {r["variant"]: r["capture_error"] for r in rows if r.get("capture_error")}
    if errs:
        lines += ["", "CUDA-graph capture errors (those variants were timed eagerly):", ""]
        lines += [f"- {v}: `{e}`" for v, e in errs.items()]
    if maxb:
        lines += ["", "Largest batch that fits (verified: caches allocated, then warm-up + capture + timed steps in the "
                  "variant's mode):", "",
                  "| variant | free GiB after weights | KV MiB / seq (B=1) | estimate | verified max B | OOM at | "
                  "tokens/s at max B | attempts (B:result) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for m in maxb:
            r = m.get("row") or {}
            att = ", ".join(f"{x['batch']}:{'ok' if x['ok'] else 'OOM'}" for x in m["attempts"])
            lines.append(f"| {m['variant']} | {_gib(m['free_bytes_after_weights'])} | "
                         f"{m['kv_bytes_per_seq'] / 2**20:.1f} | {m['estimate']} | {m['verified']} | {m['bracket_oom_at'] or '-'} | "
                         f"{r.get('tokens_per_s', float('nan')):.1f} | {att} |")
    return "\n".join(lines) + "\n"


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"plot skipped (matplotlib unavailable: {e})")
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant, color in (("fp", "tab:blue"), ("kvc", "tab:orange")):
        pts = sorted({r["batch"]: r for r in rows if r["variant"] == variant}.values(), key=lambda r: r["batch"])
        if not pts:
            continue
        ax.plot([r["batch"] for r in pts], [r["tokens_per_s"] for r in pts], "o-", color=color,
                label=f"{variant} ({', '.join(sorted({r['mode'] for r in pts}))})")
        for r in pts:
            if r.get("is_max"):
                ax.annotate(f"max B={r['batch']}", (r["batch"], r["tokens_per_s"]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=None, help="tokens already in the cache (default 32768; --tiny 300)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8; --tiny 1,2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 20; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="eager warm-up steps before capture (default 3; --tiny 1)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    p.add_argument("--variants", default="fp,kvc", help="fp,kvc")
    p.add_argument("--max-batch", action="store_true", help="find and time each variant's largest batch (CUDA)")
    p.add_argument("--max-batch-tries", type=int, default=8)
    p.add_argument("--reserve-gib", type=float, default=1.0, help="headroom kept free in the max-batch estimate")
    p.add_argument("--out", default=None, help="write bench_model.md / .json / .png here")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, 4/2 heads of 64, vocab 1000 (CPU smoke)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--scheme", default="affine",
                   help="'affine' (per-token affine, the options below) or a kvcompile scheme name (kivi, skvq, ...)")
    p.add_argument("--scheme-args", default="", help="overrides for a named scheme, e.g. pre_rope=false,v_bits=2")
    p.add_argument("--k-bits", type=float, default=2)
    p.add_argument("--v-bits", type=float, default=2)
    p.add_argument("--group", type=int, default=128, help="channels per group (capped at the head dim)")
    p.add_argument("--window", type=int, default=128, help="recent tokens kept in full precision")
    p.add_argument("--sink", type=int, default=4, help="first tokens kept in full precision")
    p.add_argument("--meta-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--fused", default="always", choices=["always", "auto", "never"],
                   help="sets KVCOMPILE_FUSED for the eager steps (a capture always takes the fused kernel)")
    p.add_argument("--fp-attn", default="prefix", choices=["prefix", "mask"],
                   help="fp baseline: SDPA over the valid prefix (default) or the whole buffer with a mask")
    p.add_argument("--no-graph", action="store_true", help="time eagerly, no CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the non-attention parts (norms, qkv, RoPE, wo, MLP, lm_head) in both variants")
    p.add_argument("--check", action="store_true", help="also compare both variants' logits on the same context (B=1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.context = a.context if a.context is not None else (300 if tiny else 32768)
    a.batch = [int(x) for x in (a.batch or ("1,2" if tiny else "1,8")).split(",") if x]
    a.steps = a.steps if a.steps is not None else (3 if tiny else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 3)
    return a


def model_config(a) -> ModelConfig:
    cfg = TINY if a.tiny else LLAMA3_8B
    if a.layers is not None:
        cfg = dataclasses.replace(cfg, n_layers=a.layers)
    return cfg


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    a = parse_args(argv)
    os.environ["KVCOMPILE_FUSED"] = a.fused
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype)
    cfg = model_config(a)
    torch.manual_seed(a.seed)
    t0 = time.time()
    bench = Bench(a, cfg, device, dtype)
    _free(device)
    variants = [v for v in a.variants.split(",") if v]
    meta = _env(device, argv)
    meta.update(
        model=(f"{'tiny' if a.tiny else 'Llama-3-8B-shaped'} decoder, random weights: hidden {cfg.dim}, {cfg.n_layers} "
               f"layers, {cfg.n_heads} q / {cfg.n_kv_heads} kv heads x {cfg.head_dim}, MLP {cfg.inter}, vocab "
               f"{cfg.vocab}, RMSNorm, RoPE theta {cfg.rope_theta:g}, {a.dtype} ({bench.W.n_params / 1e9:.3f} B params)"),
        context=a.context, weights_size=_size(bench.W.nbytes), scheme=bench.scheme_desc, fused_policy=a.fused,
        fp_desc=("static K/V [B, Hkv, L+1, D] per layer written by index, SDPA enable_gqa over the valid prefix (no mask)"
                 if a.fp_attn == "prefix" else "static K/V [B, Hkv, L+1, D] per layer written by index, SDPA enable_gqa "
                 "over the whole buffer with a boolean mask"),
        kvc_desc="two PackedKV per layer (PackedKV.empty, capacity L+1 in whole code lines), kvcompile.ops.write_pair + "
        "kvcompile.ops.attention",
        model_code="non-attention parts torch.compile'd (--compile)" if a.compile else "eager PyTorch ops (no torch.compile)",
        timing=(f"{a.warmup} eager warm-up steps, then a whole step (all layers, write + attention + MLP + lm_head) "
                f"captured in one CUDA graph, median of {a.steps} replays between CUDA events (rows marked eager: "
                "median of eager steps between CUDA events)" if device.type == "cuda" and not a.no_graph else
                f"{a.warmup} warm-up steps, median of {a.steps} eager steps" +
                (" (perf_counter; CPU runs the op references)" if device.type == "cpu" else " between CUDA events")),
        args=vars(a),
    )
    print(f"device {meta['device']}, torch {meta['torch']}, triton {meta['triton']}; {meta['model']}")
    print(f"kvc scheme: {bench.scheme_desc}; KVCOMPILE_FUSED={a.fused}; weights {_size(bench.W.nbytes)}", flush=True)
    if a.check:
        res = compare_logits(cfg, a, device=device, dtype=dtype, batch=1, seed=a.seed, bench=bench)
        meta["check_logits_rel_err"] = res["rel_err"]
        print(f"check: logits rel L2 difference kvc vs fp on the same context (B=1): {res['rel_err']:.3e}", flush=True)
        del res
        _free(device)
    rows, maxb = [], []
    for v in variants:
        for b in a.batch:
            r = None
            try:
                r = bench.run(v, b, a.steps)
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
            if r is None:
                print(f"[{v}] B={b}: out of memory, skipped", flush=True)
                _free(device)
                continue
            rows.append(r)
            print(f"[{v}] B={b}: {r['mode']} {r['step_ms']:.3f} ms/step, {r['tokens_per_s']:.1f} tok/s, "
                  f"KV {_size(r['kv_bytes'])}; {r['path']}", flush=True)
        if a.max_batch and device.type == "cuda":
            ref = min((r for r in rows if r["variant"] == v), key=lambda r: r["batch"], default=None)
            if ref is None:
                ref = bench.run(v, 1, 1, probe_only=True)
            m = bench.max_batch(v, ref)
            if m.get("row"):
                m["row"]["is_max"] = True
                rows.append(m["row"])
            maxb.append(m)
        elif a.max_batch:
            print("--max-batch needs CUDA; skipped")
    meta["wall_s"] = time.time() - t0
    md = markdown(meta, rows, maxb)
    print()
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_model.md"), "w") as f:
            f.write(md)
        with open(os.path.join(a.out, "bench_model.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows, max_batch=[{k: v for k, v in m.items() if k != "row"} for m in maxb]),
                      f, indent=1, default=str)
        png = plot(rows, os.path.join(a.out, "bench_model.png"),
                   f"decode tokens/s, L={a.context}, {meta['device']}")
        print(f"wrote {a.out}/bench_model.md, bench_model.json" + (", bench_model.png" if png else ""))
    return dict(meta=meta, rows=rows, max_batch=maxb)


if __name__ == "__main__":
    main()

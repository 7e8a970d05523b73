"""Offline SASS probe for _decode_split_kernel (no GPU): compile for sm_90 with the Triton installed here,
then print registers / spills and the instruction histogram of the hot loop.

    python -m kvcompile.kernels.sass_probe [--case gqa4|gqa8|mha|k4|win|vg32|g32k4|kivi|kivi_bf16|hf4|hf4k4|hf4win|hf8mha|
    int8|fp8|int8_bf16|int8mha|nf4|nf4g128|nf4_bf16|g16|g16d64|rope_g16|rope|rope_g16d64|skvq|skvq_d64|kivi_op]
        [--tune KEY=VALUE ...] [--set KEY=VALUE ...] [--dump DIR]

The launcher runs on CPU tensors with the real kernel replaced by a recorder; the recorded arguments give
the signature (integer args divisible by 16 get ``tt.divisibility 16`` like the runtime specialization)
and the constexprs, with the GPU settings (DOT_FP32=False, FAST_ASM=True) forced. Counts come from the
Triton on this machine (3.9), the GPU runs 3.6: compare variants with each other, not with timings; for the
GPU's version run it with a triton 3.6 venv (NOTES.md). ``smem`` is the shared memory one program needs (with
the registers, what decides how many programs share an SM). v13 / v14 showed that fewer instructions need not
mean a faster kernel: the loop is latency bound.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch

import kvcompile.kernels.decode_attention as da

CASES = {  # B, Hq, Hkv, D, L, k_bits, v_bits, sink, window, NQ[, layout: k_group, v_group, k_axis, dtype]
    "gqa4": (1, 4, 1, 128, 4096, 2, 2, 0, 0, 1),
    "gqa8": (1, 8, 1, 128, 4096, 2, 2, 0, 0, 1),
    "mha": (1, 1, 1, 128, 4096, 2, 2, 0, 0, 1),
    "k4": (1, 4, 1, 128, 4096, 4, 4, 0, 0, 1),
    "win": (1, 4, 1, 128, 4096, 2, 2, 4, 128, 1),
    # per-token groups of 32 channels (group fill, NOTES.md v11)
    "vg32": (1, 4, 1, 128, 4096, 2, 2, 0, 0, 1, dict(v_group=32)),
    "g32k4": (1, 4, 1, 128, 4096, 4, 4, 0, 0, 1, dict(k_group=32, v_group=32)),
    # KIVI: per-channel keys in groups of 32 tokens, V in groups of 32 channels, 128 window (v10, v12)
    "kivi": (1, 4, 1, 128, 4096, 2, 2, 0, 128, 1, dict(k_group=32, v_group=32, k_axis="channel")),
    "kivi_bf16": (1, 4, 1, 128, 4096, 2, 2, 0, 128, 1,
                  dict(k_group=32, v_group=32, k_axis="channel", dtype=torch.bfloat16)),
    # KIVI as kvcompile.ops launches it: device lengths, V's own (KV_MIXED), ring windows (NOTES.md v25)
    "kivi_op": (1, 4, 1, 128, 4096, 2, 2, 0, 128, 1, dict(k_group=32, v_group=32, k_axis="channel", op=True)),
    # head fill (NOTES.md v13): four KV heads of GQA-4 per program (--tune head_fill=True)
    "hf4": (1, 16, 4, 128, 4096, 2, 2, 0, 0, 1),
    "hf4k4": (1, 16, 4, 128, 4096, 4, 4, 0, 0, 1),
    "hf4win": (1, 16, 4, 128, 4096, 2, 2, 4, 128, 1),
    "hf8mha": (1, 8, 8, 128, 4096, 2, 2, 0, 0, 1),
    # 8-bit codes, one scale per token (int8 / fp8 schemes; affine 8-bit)
    "int8": (1, 4, 1, 128, 4096, 8, 8, 0, 0, 1, dict(k_format="int8", v_format="int8")),
    "fp8": (1, 4, 1, 128, 4096, 8, 8, 0, 0, 1, dict(k_format="fp8", v_format="fp8")),
    "int8_bf16": (1, 4, 1, 128, 4096, 8, 8, 0, 0, 1, dict(k_format="int8", v_format="int8", dtype=torch.bfloat16)),
    "int8mha": (1, 1, 1, 128, 4096, 8, 8, 0, 0, 1, dict(k_format="int8", v_format="int8")),
    # per-token groups of 16 channels (SKVQ's groups, here after RoPE), group fill with 8 groups per head
    "g16": (1, 4, 1, 128, 4096, 2, 2, 0, 0, 1, dict(k_group=16, v_group=16)),
    "g16d64": (1, 3, 1, 64, 4096, 2, 2, 4, 128, 1, dict(k_group=16, v_group=16)),
    # keys quantized before RoPE (skvq's pre_rope), rotated per element: groups of 16 (skvq K2V2), one per head
    "rope_g16": (1, 4, 1, 128, 4096, 2, 2, 0, 0, 1, dict(k_group=16, v_group=16, rope=True)),
    "rope": (1, 4, 1, 128, 4096, 2, 2, 0, 0, 1, dict(rope=True)),
    "rope_g16d64": (1, 3, 1, 64, 4096, 2, 2, 4, 128, 1, dict(k_group=16, v_group=16, rope=True)),
    # skvq's defaults: keys before RoPE in groups of 16, ternary values in groups of 16 (SmolLM2's shape; and D = 128)
    "skvq_d64": (1, 3, 1, 64, 4096, 2, 1.5, 4, 128, 1, dict(k_group=16, v_group=16, rope=True)),
    "skvq": (1, 4, 1, 128, 4096, 2, 1.5, 4, 128, 1, dict(k_group=16, v_group=16, rope=True)),
    # NF4 codebook codes (nqkv: blocks of 64 channels, group fill; and one block per head)
    "nf4": (1, 4, 1, 128, 4096, 4, 4, 0, 0, 1, dict(k_format="nf", v_format="nf", k_group=64, v_group=64)),
    "nf4g128": (1, 4, 1, 128, 4096, 4, 4, 0, 0, 1, dict(k_format="nf", v_format="nf")),
    "nf4_bf16": (1, 4, 1, 128, 4096, 4, 4, 0, 0, 1, dict(k_format="nf", v_format="nf", k_group=64, v_group=64,
                                                        dtype=torch.bfloat16)),
}


def record_launch(case, **tuning):
    B, Hq, Hkv, D, L, kb, vb, S, W, NQ, *rest = CASES[case]
    layout = dict(rest[0]) if rest else {}
    k_group, v_group = layout.get("k_group", D), layout.get("v_group", D)
    k_axis = layout.get("k_axis", "token")
    fmts = {"k": layout.get("k_format", "affine"), "v": layout.get("v_format", "affine")}
    n_quant = L - S - W
    f16 = torch.float16
    kw = dict(q=torch.zeros(B, Hq, NQ, D, dtype=layout.get("dtype", f16)))
    for n, bits, grp in (("k", kb, k_group), ("v", vb, v_group)):
        meta = (B, Hkv, n_quant // grp, D) if n == "k" and k_axis == "channel" else (B, Hkv, n_quant, D // grp)
        kw[f"{n}_codes"] = torch.zeros(B, Hkv, n_quant, -(-D // 5) if bits == 1.5 else int(D * bits) // 8,
                                       dtype=torch.uint8)
        kw[f"{n}_scale"] = torch.zeros(*meta, dtype=f16)
        kw[f"{n}_zero"] = torch.zeros(*meta, dtype=f16) if fmts[n] == "affine" else None
        kw[f"{n}_sink"] = torch.zeros(B, Hkv, S, D, dtype=kw["q"].dtype)
        kw[f"{n}_window"] = torch.zeros(B, Hkv, W, D, dtype=kw["q"].dtype)
    got = {}
    rope = dict(k_rope=torch.ones(D // 2), k_perm=torch.arange(D).repeat(Hkv, 1)) if layout.get("rope") else {}

    real = da._decode_split_kernel

    class Rec:
        fn = real.fn  # the kernel's parameters (kvcompile.kernels.launch reads them)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                got.update(args=args, kwargs=kwargs)
            return launch

    da._decode_split_kernel = Rec()
    if layout.get("op"):  # lengths on the device, V's own lengths (V may run ahead of K), ring windows
        lens = torch.tensor([S, n_quant, W])
        lengths = dict(lengths=lens, v_lengths=lens.clone(), window_ring=True)
    else:
        lengths = dict(n_quant=n_quant, n_window=W)
    tuning = {**lengths, **tuning}  # a --tune of the same key (e.g. window_ring) wins
    try:
        try:
            da.decode_attention(**kw, k_bits=kb, v_bits=vb, k_group_size=k_group,
                                v_group_size=v_group, k_axis=k_axis, k_format=fmts["k"], v_format=fmts["v"],
                                num_splits=2, **rope, **tuning)
        except Exception:
            if not got:
                raise
    finally:
        da._decode_split_kernel = real
    return real, got


def compile_sass(fn, args, kwargs, overrides):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    names = fn.arg_names
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    num_stages = kwargs.pop("num_stages", 3)
    fp_fusion = kwargs.pop("enable_fp_fusion", True)
    kwargs.update(DOT_FP32=False, FAST_ASM=True)
    kwargs.update(overrides)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i < len(args):
            a = args[i]
            if torch.is_tensor(a):
                sig[name] = "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                                   torch.uint8: "u8", torch.int16: "i16", torch.int64: "i64", torch.int32: "i32"}[a.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(a, bool):
                sig[name] = "i1"
            elif isinstance(a, int):
                sig[name] = "i32"
                if a % 16 == 0 and a != 0 and name not in ("n_sink", "n_quant", "n_window", "chunk"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
                if a == 1 and name not in ("n_sink", "n_quant", "n_window", "chunk"):
                    sig[name] = "constexpr"
                    consts[name] = 1
            else:
                sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
            v = kwargs.get(name, fn.params[i].default)
            consts[name] = v
    src = ASTSource(fn, sig, consts, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages,
                                                                           enable_fp_fusion=fp_fusion))
    return k


def sass_summary(k, dump=None, tag="k") -> dict | None:
    """A compiled kernel's SASS (cuobjdump, shipped with Triton): its instructions [(address, opcode, operands)], its
    loops [(first, last) instruction index, one per backward branch before the last EXIT], registers, stack bytes
    and shared memory per program. None if this Triton ships no cuobjdump. ``dump``: also write the SASS, PTX and
    TTGIR there."""
    import triton
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bindir, "cuobjdump")):
        return None
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True).stdout
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                             text=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        open(os.path.join(dump, tag + ".sass"), "w").write(sass)
        open(os.path.join(dump, tag + ".ptx"), "w").write(k.asm["ptx"])
        open(os.path.join(dump, tag + ".ttgir"), "w").write(k.asm["ttgir"])
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
    addr = {a: i for i, (a, _, _) in enumerate(ins)}
    # (backward branches past the last EXIT are out-of-line retries, e.g. an mbarrier wait's, not loops)
    last_exit = max((i for i, (_, op, _) in enumerate(ins) if op.startswith("EXIT")), default=len(ins))
    loops = []
    for i, (a, op, rest) in enumerate(ins[:last_exit]):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < a and int(m.group(1), 16) in addr:
                loops.append((addr[int(m.group(1), 16)], i))
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"ins": ins, "loops": loops, "registers": regs and int(regs.group(1)),
            "stack": stack and int(stack.group(1)),
            "shared": getattr(getattr(k, "metadata", None), "shared", None)}  # static + dynamic bytes per program


def analyse(k, dump=None, tag="k"):
    s = sass_summary(k, dump, tag)
    ins, loops = s["ins"], s["loops"]
    print(f"[{tag}] regs={s['registers']} stack={s['stack']} smem={s['shared']} total_instr={len(ins)}")
    for lo, hi in sorted(loops, key=lambda x: x[1] - x[0], reverse=True)[:3]:
        body = ins[lo:hi + 1]
        hist = collections.Counter(op.split(".")[0] for _, op, _ in body)
        top = " ".join(f"{o}:{c}" for o, c in hist.most_common(18))
        print(f"  loop {hi - lo + 1} instr: {top}")
    return len(ins)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="gqa4")
    ap.add_argument("--tune", action="append", default=[], help="launcher kwarg KEY=VALUE (python literal)")
    ap.add_argument("--set", action="append", default=[], help="kernel constexpr KEY=VALUE (python literal)")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--tag", default=None)
    a = ap.parse_args(argv)
    tuning = {k: eval(v) for k, v in (s.split("=", 1) for s in a.tune)}
    over = {k: eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    fn, got = record_launch(a.case, **tuning)
    k = compile_sass(fn, got["args"], got["kwargs"], over)
    analyse(k, a.dump, a.tag or a.case)


if __name__ == "__main__":
    main()


def line_histogram(cubin_bytes, src_file_hint="decode_attention.py", lo_hi=None):
    """Instruction count per source line (nvdisasm --print-line-info), for the hot loop if lo_hi given."""
    import triton
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    d = tempfile.mkdtemp()
    cubin = os.path.join(d, "k.cubin")
    open(cubin, "wb").write(cubin_bytes)
    txt = subprocess.run([os.path.join(bindir, "nvdisasm"), "--print-line-info", "-c", cubin],
                         capture_output=True, text=True).stdout
    cur = None
    hist = collections.Counter()
    ops = collections.defaultdict(collections.Counter)
    for line in txt.splitlines():
        m = re.search(r'line (\d+)', line)
        if "//## File" in line and m:
            cur = int(m.group(1))
            inl = re.search(r'inlined at ".*?", line (\d+)', line)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and cur is not None:
            a = int(m.group(1), 16)
            if lo_hi is None or lo_hi[0] <= a <= lo_hi[1]:
                hist[cur] += 1
                ops[cur][m.group(3).split(".")[0]] += 1
    return hist, ops

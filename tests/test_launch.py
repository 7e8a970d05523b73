"""Cached launch plans (kvcompile.kernels.launch): a launcher's checks and decisions run once per layout and storage;
later calls only fill in their own tensors, and on CUDA skip Triton's dispatch.

Every test compares a call served by a cached plan with the same call on a freshly built plan (bit for bit: the same
kernel on the same inputs) and, for attention, with the float32 reference. Without CUDA the kernels run under the
Triton interpreter on small shapes; the direct launches (``CompiledKernel.run``) are checked on the GPU only.
"""

import gc
import importlib
import os
import weakref

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import kvcompile.kernels.decode_attention as da  # noqa: E402
import kvcompile.kernels.quantize_write as qw  # noqa: E402
from kvcompile.kernels import launch  # noqa: E402

if not ON_GPU and type(da._decode_split_kernel).__name__ != "InterpretedFunction":
    da = importlib.reload(da)  # imported earlier in this process without the interpreter: decorate again under it
if not ON_GPU and type(qw._quantize_write_kernel).__name__ != "InterpretedFunction":
    qw = importlib.reload(qw)

from kvcompile.cache import PackedKV  # noqa: E402
from kvcompile.kernels.reference import decode_attention_reference  # noqa: E402
from kvcompile.schemes import TensorQuant  # noqa: E402

try:  # tests/ has no __init__.py: pytest's default import mode puts tests/ itself on sys.path
    from kernel_inputs import TOL, make_inputs, with_rope  # noqa: E402
except ImportError:
    from tests.kernel_inputs import TOL, make_inputs, with_rope  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
STORAGE = ("codes", "scale", "zero", "sink", "window", "counts")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inputs(**over):
    kw = dict(B=2, Hkv=2, r=4, NQ=1, D=64, S=2, n_quant=40, n_window=5, k_bits=2, v_bits=2, k_group=64, v_group=64,
              dtype=torch.float16, lens=[(2, 40, 5), (2, 33, 3)], seed=1)
    kw.update(over)
    return make_inputs(**kw)


def _fresh(kw):
    """The same call on a plan built for it alone."""
    da._DECODE_PLANS.clear()
    out = da.decode_attention(**kw)
    da._DECODE_PLANS.clear()
    return out


def _check_reference(kw, out, lse):
    ref_out, ref_lse = decode_attention_reference(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    rel = ((out.float().cpu() - ref_out).norm() / ref_out.norm()).item()
    assert rel < TOL[kw["q"].dtype][0], rel
    assert (lse.cpu() - ref_lse).abs().max().item() < TOL[kw["q"].dtype][1] * max(1.0, ref_lse.abs().max().item() / 8)


@pytest.mark.parametrize("layout", [
    dict(),
    dict(k_bits=8, v_bits=8, k_format="int8", v_format="int8"),  # codes read as int16 views made per call
    dict(k_bits=4, v_bits=4, k_group=16, v_group=16, r=2),  # group fill
    dict(k_axis="channel", k_group=16, lens=[(0, 32, 5), (0, 16, 9)], v_lag=[3, 0], S=0),  # KIVI: V ahead of K
    dict(rope=True),  # keys before RoPE: q's partners and the angle table derived per call
])
def test_cached_plan_matches_a_fresh_one(layout):
    layout = dict(layout)
    rope = layout.pop("rope", False)
    kw = _inputs(**layout)
    if rope:
        kw = with_rope(kw, rotary=64, permuted=True, seed=3)
    q = kw["q"]

    def new_q():
        if rope:  # a non-contiguous q: the plan makes it contiguous each call
            return torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype,
                               device=q.device).transpose(1, 2)
        return torch.randn_like(q)

    da._DECODE_PLANS.clear()
    out1, _ = da.decode_attention(**dict(kw, q=new_q()))
    assert len(da._DECODE_PLANS) == 1
    kw2 = dict(kw, q=new_q())
    out2, lse2 = da.decode_attention(**kw2)
    assert da._DECODE_PLANS.hits == 1  # served by the plan (a new q with the same shape and strides)
    ref2, ref_lse2 = _fresh(kw2)
    assert torch.equal(out2, ref2) and torch.equal(lse2, ref_lse2)
    _check_reference(kw2, out2, lse2)
    assert not torch.equal(out1, out2)


def test_device_lengths_are_read_each_call():
    """A decode step changes only the counts on the device: the cached plan must see the new lengths."""
    kw = _inputs()
    da._DECODE_PLANS.clear()
    da.decode_attention(**kw)
    kw["lengths"][0, 1] -= 9  # one row's packed middle shorter, in place
    kw["lengths"][1, 2] += 1
    hits = da._DECODE_PLANS.hits
    out, lse = da.decode_attention(**kw)
    assert da._DECODE_PLANS.hits == hits + 1
    _check_reference(kw, out, lse)


def test_new_storage_or_changed_arguments_build_a_new_plan():
    kw = _inputs()
    da._DECODE_PLANS.clear()
    da.decode_attention(**kw)
    da.decode_attention(**dict(kw, k_codes=kw["k_codes"].clone()))  # another tensor, same shape
    da.decode_attention(**dict(kw, sm_scale=0.5))
    da.decode_attention(**dict(kw, q=kw["q"].clone()))  # a new q of the same shape, strides and dtype: the plan
    assert len(da._DECODE_PLANS) == 3 and da._DECODE_PLANS.hits == 1


def test_bad_input_after_a_cached_plan_still_raises():
    kw = _inputs()
    da.decode_attention(**kw)
    with pytest.raises(ValueError, match="dtype"):
        da.decode_attention(**dict(kw, q=kw["q"].float()))
    with pytest.raises(ValueError, match="k_codes shape"):
        da.decode_attention(**dict(kw, k_codes=kw["k_codes"][..., :-1]))


def test_plans_hold_no_storage():
    """A dropped cache is freed: the plan cache keeps weak references only."""
    kw = _inputs()
    da.decode_attention(**kw)
    ref = weakref.ref(kw["k_codes"])
    del kw
    gc.collect()
    assert ref() is None


def test_plan_cache_checks_identity_and_bounds():
    cache = launch.PlanCache(maxsize=2)
    a, b = torch.zeros(4), torch.zeros(4)
    q = torch.zeros(2)
    key = launch.PlanCache.key((q,), (a,), ("x",))
    cache.put(key, (a,), "plan")
    assert cache.get(key, (a,)) == "plan"
    assert cache.get(key, (b,)) is None  # same key (as if a's id and address were reused), another object
    assert len(cache) == 0
    for i in range(3):
        cache.put(("k", i), (a,), i)
    assert len(cache) == 2 and cache.get(("k", 0), (a,)) is None and cache.get(("k", 2), (a,)) == 2


def test_launch_rejects_a_tensor_not_among_the_sources():
    with pytest.raises(ValueError, match="not one of the call's tensors"):
        launch.Launch(da._merge_kernel, (1,), (torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 1),
                      dict(H_KV=1, GQA=1, NQ=1, D=64, SPLITS_P2=1, BLOCK_D=64, DTYPE=None, BALANCE=False,
                           FP_SPLIT=False, lens_ptr=None, slen_b=0, slen_p=0, s_cap=0, q_cap=0, w_cap=0, n_rows=1,
                           B_P2=1, BLOCK_N=16), sources=())


@pytest.mark.parametrize("kq,vq", [
    (TensorQuant("affine", 2, None, "token"), TensorQuant("affine", 2, None, "token")),  # one layout: shared args
    (TensorQuant("affine", 2, 8, "channel"), TensorQuant("affine", 2, 16, "token")),  # KIVI: the mixed kernel
    (TensorQuant("nf", 4, 32, "token"), TensorQuant("int8", 8)),  # the NF codebook derived per call
])
def test_write_plans_match_the_reference(kq, vq):
    """Appends through cached write plans (one layer's pair, many steps) write exactly what PackedKV.append writes."""
    b, h, d = 2, 2, 64
    kw = dict(capacity=64, n_sink=2, window=4, dtype=torch.float16, device=DEVICE)
    kern = [PackedKV.empty(b, h, d, kq, **kw), PackedKV.empty(b, h, d, vq, **kw)]
    ref = [PackedKV.empty(b, h, d, kq, **kw), PackedKV.empty(b, h, d, vq, **kw)]
    for got, want in zip(kern, ref):  # the same bytes everywhere, garbage past the valid rows included
        for name in STORAGE:
            t = getattr(want, name)
            if t is not None and t.is_floating_point():
                t.normal_()
            if t is not None:
                getattr(got, name).copy_(t)
    gen = torch.Generator().manual_seed(0)
    qw._WRITE_PLANS.clear()
    hits = qw._WRITE_PLANS.hits
    for step, t in enumerate([5, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1]):
        new_k, new_v = (torch.randn(b, h, t, d, generator=gen).to(DEVICE) for _ in range(2))
        k, v = kern
        second = dict(new=new_v, codes=v.codes, scale=v.scale, zero=v.zero, sink=v.sink, window=v.window, perm=None,
                      counts=v.counts, kind=vq.kind, bits=vq.bits, group_size=vq.group_size or 0, axis=vq.axis,
                      clip_ratio=vq.clip_ratio, n_sink=v.n_sink, window_size=v.window_size)
        same = qw.quantize_write(new=new_k, codes=k.codes, scale=k.scale, zero=k.zero, sink=k.sink, window=k.window,
                                 perm=None, counts=k.counts, kind=kq.kind, bits=kq.bits, group_size=kq.group_size or 0,
                                 axis=kq.axis, clip_ratio=kq.clip_ratio, n_sink=k.n_sink, window_size=k.window_size,
                                 pair=second)
        assert same == (kq == vq)
        ref[0].append(new_k)
        ref[1].append(new_v)
    assert qw._WRITE_PLANS.hits - hits >= 8  # one plan per token count (5, 1, 3): the 1-token steps reuse theirs
    for got, want in zip(kern, ref):
        for name in STORAGE:
            a, w = getattr(got, name), getattr(want, name)
            assert (a is None) == (w is None)
            if a is not None:
                assert torch.equal(a, w), name


def test_launch_hooks_turn_direct_launches_off():
    """A profiler's Triton launch hook must see every launch: direct launches wait while one is set."""
    knobs = pytest.importorskip("triton.knobs")
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton's launch hooks are not chains")

    def hook(*args, **kwargs):
        pass

    assert launch._hooks_idle()
    chain.add(hook)
    try:
        assert not launch._hooks_idle()
    finally:
        chain.remove(hook)
    assert launch._hooks_idle()


class _NoDispatch:
    """Stands in for a kernel whose launches must not go through Triton's dispatch."""

    def __init__(self, fn):
        self.fn = fn.fn

    def __getitem__(self, grid):
        raise AssertionError("dispatched through kernel[grid] instead of launching directly")


@pytest.mark.skipif(not ON_GPU, reason="direct launches (CompiledKernel.run) run on CUDA only")
def test_direct_launch_matches_dispatch(monkeypatch):
    kw = _inputs(B=4, Hkv=8, D=128, n_quant=3000, n_window=100, lens=[(2, 3000, 100)] * 4, k_group=128, v_group=128)
    da._DECODE_PLANS.clear()
    outs = [da.decode_attention(**kw)]  # dispatched (compiles)
    (plan,) = [e[1] for e in da._DECODE_PLANS._d.values()]
    assert plan.split.compiled is not None and plan.merge is not None and not launch._DIRECT_BROKEN
    real = plan.split.fn, plan.merge.fn
    plan.split.fn, plan.merge.fn = _NoDispatch(real[0]), _NoDispatch(real[1])
    outs += [da.decode_attention(**kw) for _ in range(2)]  # launched directly
    plan.split.fn, plan.merge.fn = real
    monkeypatch.setenv("KVCOMPILE_DIRECT_LAUNCH", "0")
    disp = _fresh(kw)
    for out, lse in outs:
        assert torch.equal(out, disp[0]) and torch.equal(lse, disp[1])


@pytest.mark.skipif(not ON_GPU, reason="direct launches (CompiledKernel.run) run on CUDA only")
def test_direct_write_launches_match_dispatch(monkeypatch):
    """A layer's pair written step after step through direct launches writes what the dispatched kernel writes."""
    from kvcompile import ops

    b, h, d = 2, 8, 128
    storages = []
    for direct in ("1", "0"):
        monkeypatch.setenv("KVCOMPILE_DIRECT_LAUNCH", direct)
        qw._WRITE_PLANS.clear()
        gen = torch.Generator().manual_seed(0)
        kv = [PackedKV.empty(b, h, d, q, capacity=512, n_sink=4, window=32, dtype=torch.float16, device="cuda")
              for q in (TensorQuant("affine", 2, 32, "channel"), TensorQuant("affine", 2, 32, "token"))]
        for t in [100] + [1] * 40:
            ops.write_pair(kv[0], torch.randn(b, h, t, d, generator=gen).cuda(), kv[1],
                           torch.randn(b, h, t, d, generator=gen).cuda())
        plan = next(reversed(qw._WRITE_PLANS._d.values()))[1]  # the one-token step's, used last
        assert (plan.launch.compiled is not None) == (direct == "1")
        storages.append(kv)
    for got, want in zip(*storages):
        for name in STORAGE:
            assert torch.equal(getattr(got, name), getattr(want, name)), name

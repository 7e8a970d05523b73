"""Cached launches: a launcher's checks and decisions run once per layout, later calls fill in their tensors.

An eager decode step calls each kernel launcher once per layer with the same storage tensors and a new query.
Before this module the launchers validated every argument, re-derived every tuning decision and went through
Triton's JIT dispatch each call: on the H100 machine's host an eager attention call cost 174 us and a write
pair 116 us, of which the ``kernel[grid](...)`` dispatch alone was 58 (+ 21 for the merge) and 39 us. With plans and
direct launches: 59 and 44 us (``benchmarks/bench_eager.py --breakdown``); an eager Llama-3-8B-shaped decode step at
4k tokens 26.2 against 39.0 ms (BENCHMARKS.md, "Eager host cost").

A launcher now builds a *plan* the first time it sees a layout: the validated, decided argument list of each launch
with the call's tensors replaced by slots (``Launch``). Later calls with the same layout look the plan up and only
fill in the slots. Plans are keyed by the identity (and data pointer) of the storage tensors, the query's shape,
strides, dtype and alignment, and every non-tensor argument; a hit also checks, through weak references, that the
storage tensors are the very objects the plan was built from (a freed tensor's id and address can be reused). A
plan holds no tensor (a dropped cache is freed as before). What a plan cannot see: a storage tensor whose shape
or strides were changed in place (``resize_``, ``as_strided_``, ``set_``), which no kvcompile storage does.

``Launch`` also skips Triton's dispatch once the kernel is compiled: the first launch goes through
``kernel[grid](...)``, which compiles and returns the compiled kernel; later ones call its launcher directly
(``CompiledKernel.run``, the call Triton's own dispatch ends in) with the same arguments. That is Triton's
internal interface (checked on triton 3.6 on the GPU; the tests compare it with the dispatch bit for bit). It is
skipped where it could differ: while Triton launch hooks are set (profilers), on another current device than
the first launch's, under the interpreter, or with ``KVCOMPILE_DIRECT_LAUNCH=0``. If the direct call raises
(another Triton's interface), it is switched off for the process and the dispatch used, with one warning.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from collections import OrderedDict

import torch
from triton.runtime import driver as _driver

try:
    from triton import knobs as _knobs
except ImportError:  # a Triton without knobs: hooks cannot be checked, so no direct launches
    _knobs = None

log = logging.getLogger("kvcompile")

_DIRECT_BROKEN: list[str] = []  # the first direct-launch error, if any (then dispatch only)
_PARAMS: dict = {}  # a kernel's Python function -> its parameters (name, default) in order


def _params(fn) -> list[tuple[str, object]]:
    """A Triton kernel's parameters in order with their defaults (``inspect.Parameter.empty`` where none); the same
    for the JIT and the interpreter, whose objects both keep the Python function as ``fn``."""
    f = getattr(fn.fn, "__func__", fn.fn)  # (a stand-in class holding the function as an attribute binds it)
    p = _PARAMS.get(f)
    if p is None:
        p = [(n, q.default) for n, q in inspect.signature(f).parameters.items()]
        _PARAMS[f] = p
    return p


class Launch:
    """One launch of ``fn`` with every argument fixed except the call's tensors.

    Built from a first call's arguments (``args``, ``kwargs``, as ``fn[grid](*args, **kwargs)`` takes them) and that
    call's tensors ``sources``: every tensor argument must be one of ``sources`` (by identity); it becomes a slot
    that a later call fills with its own ``sources[j]``. ``kwargs`` that are not parameters of ``fn`` (num_warps,
    num_stages, ...) are launch options. ``stable``: the indices of ``sources`` that are the same tensors at the same
    addresses in every call of this plan (the storage: the plan's key holds their identity and address).

    Direct launches pass every pointer as an int (Triton's launcher takes ints as addresses): the stable ones read
    once, the others by ``data_ptr()`` per call. A tensor costs the launcher a ``data_ptr`` call and a driver query
    (``cuPointerGetAttribute``) per argument; the first, dispatched launch made those checks for this plan's
    device."""

    __slots__ = ("fn", "grid", "vals", "slots", "options", "nargs", "kw_idx", "compiled", "device", "stable", "dynamic",
                 "direct_vals")

    def __init__(self, fn, grid, args, kwargs, sources, stable=()):
        params = _params(fn)
        names = {n for n, _ in params}
        vals = []
        for i, (name, default) in enumerate(params):
            if i < len(args):
                v = args[i]
            elif name in kwargs:
                v = kwargs[name]
            elif default is not inspect.Parameter.empty:
                v = default
            else:
                raise TypeError(f"Launch: no value for {fn.fn.__name__}'s parameter {name!r}")
            vals.append(v)
        if len(args) > len(params):
            raise TypeError(f"Launch: {len(args)} positional arguments for {len(params)} parameters")
        slots = []
        for i, v in enumerate(vals):
            if isinstance(v, torch.Tensor):
                for j, s in enumerate(sources):
                    if s is v:
                        break
                else:
                    raise ValueError(f"Launch: {fn.fn.__name__}'s tensor argument {params[i][0]!r} is not one of the "
                                     "call's tensors (a launcher bug: every tensor must come from sources)")
                slots.append((i, j))
                vals[i] = None  # the plan holds no tensor
        self.fn, self.grid = fn, tuple(grid) + (1,) * (3 - len(grid))
        self.vals, self.slots = vals, tuple(slots)
        self.options = {k: v for k, v in kwargs.items() if k not in names}
        # the dispatch gets the arguments as the launcher passed them (positional, then keywords)
        self.nargs = len(args)
        self.kw_idx = tuple((n, i) for i, (n, _) in enumerate(params) if i >= len(args) and n in kwargs)
        self.compiled, self.device = None, None
        stable = set(stable)
        self.stable = tuple((i, j) for i, j in self.slots if j in stable)
        self.dynamic = tuple((i, j) for i, j in self.slots if j not in stable)
        self.direct_vals = None  # vals with the stable pointers as ints (the first direct launch fills it)

    def __call__(self, sources) -> None:
        ck = self.compiled
        if ck is not None and not _DIRECT_BROKEN:
            dev = _driver.active.get_current_device()
            if dev == self.device and _hooks_idle():
                vals = self.direct_vals
                if vals is None:
                    vals = list(self.vals)
                    for i, j in self.stable:
                        vals[i] = sources[j].data_ptr()
                    self.direct_vals = vals
                vals = list(vals)
                for i, j in self.dynamic:
                    vals[i] = sources[j].data_ptr()
                try:
                    ck.run(*self.grid, _driver.active.get_current_stream(dev), ck.function, ck.packed_metadata, None,
                           None, None, *vals)
                    return
                except (TypeError, AttributeError, ValueError) as e:  # another Triton's launcher interface
                    _DIRECT_BROKEN.append(repr(e))
                    log.warning("kvcompile: direct kernel launches are off for this process (Triton's compiled "
                                "kernel did not take them: %r); launching through Triton's dispatch", e)
        vals = list(self.vals)
        for i, j in self.slots:
            vals[i] = sources[j]
        r = self.fn[self.grid](*vals[:self.nargs], **{n: vals[i] for n, i in self.kw_idx}, **self.options)
        if ck is None and _direct_wanted() and all(hasattr(r, a) for a in ("run", "function", "packed_metadata")):
            self.compiled, self.device = r, _driver.active.get_current_device()


def _hooks_idle() -> bool:
    """No Triton launch hook is set (a profiler's): Triton's hooks are chains (``HookChain``), idle while empty."""
    if _knobs is None:
        return False
    rt = _knobs.runtime
    return all(h is None or getattr(h, "calls", None) == [] for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _direct_wanted() -> bool:
    return os.environ.get("KVCOMPILE_DIRECT_LAUNCH", "1") != "0" and not _DIRECT_BROKEN


class PlanCache:
    """Plans of one launcher, least recently used first out (``maxsize``). ``key`` takes the call's own tensors
    (``calls``, new each call: the query, the new tokens; their shape, strides, dtype, device and 16-byte alignment),
    its storage tensors (any order, None allowed; identity and data pointer) and the non-tensor arguments; ``get``
    returns the plan only if the storage tensors are still the plan's objects."""

    def __init__(self, maxsize: int = 512):
        self.maxsize = maxsize
        self._d: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(calls, storage, scalars) -> tuple:
        return (scalars, tuple((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16) for t in calls),
                tuple(None if t is None else (id(t), t.data_ptr()) for t in storage))

    def get(self, key, storage):
        e = self._d.get(key)
        if e is None:
            self.misses += 1
            return None
        refs, plan = e
        for r, t in zip(refs, storage):
            if (None if r is None else r()) is not t:
                self._d.pop(key, None)
                self.misses += 1
                return None
        try:
            self._d.move_to_end(key)
        except KeyError:  # dropped meanwhile (another thread's put evicted it): the plan itself is still valid
            pass
        self.hits += 1
        return plan

    def put(self, key, storage, plan) -> None:
        self._d[key] = (tuple(None if t is None else weakref.ref(t) for t in storage), plan)
        if len(self._d) > self.maxsize:
            self._d.popitem(last=False)

    def clear(self) -> None:
        """Drop every plan and reset the hit / miss counts."""
        self._d.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

"""Find the first prefill call of tests/test_kernels_prefill.py::<test> (session 21; run from the repository root as exp/prefill_iam.py) that makes an illegal memory access on the GPU:
each call synchronised and its arguments printed before it runs."""
import os, sys, traceback
sys.path.insert(0, "tests")
import torch
import test_kernels_prefill as mod

name = sys.argv[1]
orig = mod.pa.prefill_attention
n = [0]

def desc(v):
    if torch.is_tensor(v):
        return f"T{tuple(v.shape)}{str(v.dtype)[6:]}{'' if v.is_contiguous() else ' nc'}"
    return repr(v)

def wrapped(**kw):
    n[0] += 1
    print(f"call {n[0]}: " + ", ".join(f"{k}={desc(v)}" for k, v in kw.items()), flush=True)
    out = orig(**kw)
    try:
        torch.cuda.synchronize()
    except Exception as e:
        print("FAILED AT CALL", n[0], repr(e)[:200], flush=True)
        os._exit(3)
    return out

mod.pa.prefill_attention = wrapped
try:
    extra = dict(a.split('=') for a in sys.argv[2:])
    getattr(mod, name)(**{k: int(v) for k, v in extra.items()})
    print("OK", name, n[0], "calls")
except Exception:
    traceback.print_exc(limit=3)

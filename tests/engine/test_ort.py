"""The ONNX Runtime engine (``--engine ort``, tiny GPT-2 config): within the accuracy guard of float32, tokens
independent of batch mates through the scheduler, the export cache reused and rebuilt when weights change,
its defaults and refusals."""
import importlib.util
import sys

import pytest

pytest.importorskip("onnxruntime")

from llm_psi.cli import UsageError  # noqa: E402
from llm_psi.engine import accuracy, ort  # noqa: E402
from llm_psi.engine.batch import BatchEngine  # noqa: E402
from llm_psi.engine.loop import make_engine  # noqa: E402

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "A", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export cache for the module (the tiny export takes seconds)."""
    path = tmp_path_factory.mktemp("ort-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_PSI_PEER_CACHE", str(path))
        yield path


@pytest.fixture(scope="module", params=["none", "int8"])
def engine(request, cache):
    return make_engine("ort", tiny=True, seed=0, torch_threads=1, quantize=request.param)


@pytest.mark.slow
def test_greedy_tokens_and_logits_within_the_guard(cache):
    rows = accuracy.guard(tiny=True, steps=12, variants=[("float32", "none", "ort"), ("float32", "int8", "ort")])
    by = {r["quantize"]: r for r in rows}
    assert [r["engine"] for r in rows] == ["ort", "ort"] and all(r["within_guard"] for r in rows), rows
    assert by["none"]["max_abs_logit_diff"] < 1e-4 and by["none"]["greedy_agreement"] == 1.0   # same math
    assert 0 < by["int8"]["max_abs_logit_diff"]                                                # really int8


def test_identity_names_the_engine_and_its_export(engine, cache):
    ident = engine.identity()
    assert ident["engine"] == "ort" and ident["ort_threads"] == 1 and ident["ort_spinning"] is False
    assert (ident["quantized_linears"] > 0) == (ident["quantize"] == "int8")
    assert ident["kv_cache"] == "ort-concat"                  # the default
    assert all((cache / "ort" / ident["ort_export"] / f"{g}.onnx").exists() for g in ort.GRAPHS)


def test_the_shared_kv_cache_gives_the_concatenating_graphs_logits(cache):
    """The decode graph that updates its KV cache in place (--ort-kv shared) against the one that concatenates,
    float32, step by step with the same tokens, through rows of other lengths joining and leaving and the
    buffers growing past their reserve: the same logits within float tolerance."""
    import torch
    eng = make_engine("ort", tiny=True, seed=0, torch_threads=1, kv="shared")
    assert eng.identity()["kv_cache"] == "ort-shared"
    shared = ort.OrtSharedDecodeBatch(eng.sessions, reserve=2)
    concat = ort.OrtDecodeBatch(ort.Sessions(eng.sessions.path, kv="concat"))
    ids = [eng.encode(p).reshape(1, -1) for p in PROMPTS]
    last = {}

    def join(k):
        for name, b in (("shared", shared), ("concat", concat)):
            logits, row = b.prefill(ids[k])
            b.add(row)
            last[name] = torch.cat([last[name], logits]) if name in last else logits

    def steps(n):
        for _ in range(n):
            torch.testing.assert_close(last["shared"], last["concat"], rtol=1e-4, atol=1e-4)
            tokens = last["concat"].argmax(-1, keepdim=True)
            last["shared"], last["concat"] = shared.step(tokens), concat.step(tokens)

    join(1)
    join(0)
    first = shared.capacity
    steps(3)
    assert shared.capacity > first        # the reserve of 2 ran out at the third step: the buffers grew
    join(2)
    steps(2)
    for name, b in (("shared", shared), ("concat", concat)):
        b.remove([0])
        last[name] = last[name][1:]
    assert shared.lengths == concat.lengths and len(shared) == 2
    steps(4)
    torch.testing.assert_close(last["shared"], last["concat"], rtol=1e-4, atol=1e-4)


def test_same_seed_same_tokens_whatever_the_batch_mates(engine):
    """Through the scheduler: a request's tokens equal the unbatched engine's for its seed, alone or beside
    others of other lengths that join and leave at other steps."""
    alone = engine.generate(PROMPTS[1], 9, seed=7).text
    be = BatchEngine(engine, max_batch=4)
    try:
        mixed = be.generate_many(PROMPTS, 9, seeds=[3, 7, 5, 1])   # PROMPTS[1] has seed 7
        other = be.generate_many([PROMPTS[1], PROMPTS[2]], 9, seeds=[7, 2])
        short = be.generate_many([PROMPTS[0], PROMPTS[1]], 4, seeds=[9, 9])
        again = be.generate_many(PROMPTS, 9, seeds=[3, 7, 5, 1])
    finally:
        be.close()
    assert [g.text for g in again] == [g.text for g in mixed]     # same seeds and mates: the same tokens
    if engine.quantize == "int8":
        # int8: the activation scale is shared by the whole batch (per tensor, per call), so a request's
        # logits move with its batch mates and a sampled token can flip; only the counts are promised
        assert [g.output_tokens for g in mixed] == [9] * 4 and short[1].output_tokens == 4
        return
    assert mixed[1].text == other[0].text == alone
    assert [g.output_tokens for g in mixed] == [9] * 4
    assert short[0].text == engine.generate(PROMPTS[0], 4, seed=9).text
    assert [g.text for g in mixed] != [mixed[1].text] * 4


@pytest.mark.slow
def test_export_cache_reused_and_rebuilt_when_weights_change(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PSI_PEER_CACHE", str(tmp_path))
    calls = []
    real = ort._export
    monkeypatch.setattr(ort, "_export", lambda model, out: (calls.append(out), real(model, out)))
    first = make_engine("ort", tiny=True, seed=0, torch_threads=1)
    again = make_engine("ort", tiny=True, seed=0, torch_threads=1)
    assert len(calls) == 1 and again.sessions.path == first.sessions.path
    other = make_engine("ort", tiny=True, seed=1, torch_threads=1)     # other weights: a new export
    assert len(calls) == 2 and other.sessions.path != first.sessions.path
    with again.torch.no_grad():
        again.model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0   # one weight changed: a new key
    assert ort.cache_key(again.model, "none") != ort.cache_key(first.model, "none")
    assert sorted(p.name for p in (tmp_path / "ort").iterdir()) == sorted(
        {first.identity()["ort_export"], other.identity()["ort_export"]})   # no temporary directory left


def test_defaults_ort_for_serve_and_batching_paper_keeps_its_generate():
    from llm_psi.load.generator import parse_config
    from llm_psi.service.server import parse_serve
    setting = lambda c: (c.engine, c.dtype, c.quantize)  # noqa: E731
    for label in ("baseline", "cgroups", "psi"):
        assert setting(parse_config(["--config", label])) == ("generate", "float32", "none")
        assert setting(parse_serve(["--config", label])[0]) == ("generate", "float32", "none")
    for label in ("batch", "batch_psi"):
        assert setting(parse_config(["--config", label])) == ("ort", "float32", "int8")
        assert setting(parse_serve(["--config", label])[0]) == ("ort", "float32", "int8")
    assert setting(parse_serve([])[0]) == ("ort", "float32", "int8")
    assert setting(parse_serve(["--engine", "loop"])[0]) == ("loop", "float32", "int8")   # today's default
    assert setting(parse_serve(["--dtype", "bfloat16"])[0]) == ("loop", "bfloat16", "none")
    assert setting(parse_config(["--config", "batch", "--dtype", "bfloat16"])) == ("loop", "bfloat16", "none")
    assert setting(parse_config(["--config", "batch", "--engine", "loop"])) == ("loop", "float32", "int8")
    assert parse_serve([])[0].ort_kv == "concat" and parse_serve(["--ort-kv", "shared"])[0].ort_kv == "shared"


def test_the_service_builds_the_ort_engine_with_its_kv_cache(cache):
    from llm_psi.service import lifecycle
    from llm_psi.service.server import parse_serve
    for kv in ("concat", "shared"):
        cfg = parse_serve(["--tiny", "--engine", "ort", "--ort-kv", kv, "--torch-threads", "1"])[0]
        assert lifecycle.load_engine(cfg).identity()["kv_cache"] == f"ort-{kv}"


def test_refusals_in_one_line(monkeypatch):
    from llm_psi.load.generator import parse_config
    with pytest.raises(UsageError, match="--engine ort runs --dtype float32"):
        parse_config(["--engine", "ort", "--dtype", "bfloat16"])
    with pytest.raises(UsageError, match="--ort-kv is an option of --engine ort, not of --engine loop"):
        parse_config(["--engine", "loop", "--ort-kv", "shared"])
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    with pytest.raises(UsageError, match="--engine ort needs onnxruntime"):
        parse_config(["--config", "batch"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import fails
    with pytest.raises(ort.OrtUnavailable, match="needs onnxruntime"):
        make_engine("ort", tiny=True)
    with pytest.raises(ValueError, match="dtype float32"):
        make_engine("ort", tiny=True, dtype="bfloat16")

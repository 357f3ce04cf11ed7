"""The engine's precisions and its preallocated KV cache (tiny GPT-2 config): equality with Hugging Face's
forward in float32, bfloat16 and int8 close to float32, exact token counts, real int8 layers."""
import pytest

from llm_psi.engine import accuracy, net
from llm_psi.engine.batch import BatchEngine
from llm_psi.engine.loop import Engine, make_engine

PROMPT = "Why is the sky blue during the day?"
PRECISIONS = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")]


@pytest.fixture(scope="module")
def engines():
    return {p: Engine(tiny=True, seed=0, torch_threads=1, dtype=p[0], quantize=p[1]) for p in PRECISIONS}


def test_preallocated_cache_decode_equals_hf_forward(engines):
    """The loop engine's own attention over its preallocated cache gives Hugging Face's logits (float32)."""
    e = engines[("float32", "none")]
    torch = e.torch
    ids = e.encode(PROMPT)
    feed = [(37 * k + 11) % 5000 for k in range(30)]
    with torch.inference_mode():
        step = e._stepper(ids, len(feed) + 1)
        res = e.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        worst = (step(ids) - res.logits[:, -1]).abs().max().item()
        for token in feed:
            t = torch.tensor([[token]])
            res = e.model(input_ids=t, cache=res.cache, use_cache=True, logits_to_keep=1)
            worst = max(worst, (step(t) - res.logits[:, -1]).abs().max().item())
    assert worst < 1e-4


def test_int8_quantizes_every_linear_layer(engines):
    """Conv1D is converted first, so every block layer and the output head are dynamic int8 modules."""
    from transformers.pytorch_utils import Conv1D
    model = engines[("float32", "int8")].model
    assert net.quantized_linears(model) == 4 * model.config.n_layer + 1
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert net.quantized_linears(engines[("float32", "none")].model) == 0


def test_conv1d_conversion_keeps_the_function():
    e = Engine(tiny=True, seed=0)
    torch = e.torch
    ids = e.encode(PROMPT)
    with torch.inference_mode():
        before = e.model(input_ids=ids).logits
        assert net.convert_conv1d(e.model) == 4 * e.model.config.n_layer
        after = e.model(input_ids=ids).logits
    assert (before - after).abs().max().item() < 1e-5


def test_bf16_and_int8_close_to_float32():
    """Stated tolerance on the tiny config (float32 logits up to ~1.2): bf16 within 0.05, int8 within 0.1,
    greedy tokens (teacher-forced) at least 90% equal to float32's."""
    loop_variants = [v for v in accuracy.VARIANTS if len(v) == 2]
    rows = {(r["dtype"], r["quantize"]): r for r in accuracy.guard(tiny=True, steps=12, variants=loop_variants)}
    assert rows[("bfloat16", "none")]["max_abs_logit_diff"] < 0.05
    assert rows[("float32", "int8")]["max_abs_logit_diff"] < 0.1
    assert all(0 < r["max_abs_logit_diff"] and r["greedy_agreement"] >= 0.9 for r in rows.values())
    assert all(r["steps"] == 12 and r["teacher_forced"] and r["within_guard"] for r in rows.values())


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: "-".join(p))
def test_exact_token_counts_every_precision(engines, precision):
    e = engines[precision]
    assert e.identity()["dtype"] == precision[0] and e.identity()["quantize"] == precision[1]
    g = e.generate(PROMPT, 7, seed=1)
    assert g.output_tokens == 7 == len(g.token_times)
    be = BatchEngine(e, max_batch=3)
    try:
        gens = be.generate_many([PROMPT, PROMPT, "A"], 6, seeds=[1, 2, 3])
    finally:
        be.close()
    assert [x.output_tokens for x in gens] == [6, 6, 6]
    if precision == ("float32", "none"):  # batched, prefilled together: the unbatched engine's tokens
        assert gens[0].text == e.generate(PROMPT, 6, seed=1).text


@pytest.mark.parametrize("precision", PRECISIONS[1:], ids=lambda p: "-".join(p))
def test_generate_engine_in_other_precisions(precision):
    """Hugging Face generate() runs on the converted model too (Linear layers in place of Conv1D)."""
    e = make_engine("generate", tiny=True, seed=0, dtype=precision[0], quantize=precision[1])
    assert e.generate(PROMPT, 4, seed=0).output_tokens == 4
    assert (e.identity()["dtype"], e.identity()["quantize"]) == precision


def test_batch_engine_builds_its_engine_and_refuses_bad_options(engines):
    be = BatchEngine(max_batch=2, tiny=True, seed=0, dtype="bfloat16")
    try:
        assert be.identity()["dtype"] == "bfloat16" and be.identity()["max_batch"] == 2
        with pytest.raises(ValueError, match="seeds"):
            be.generate_many([PROMPT], 3, seeds=[1, 2])
    finally:
        be.close()
    with pytest.raises(TypeError, match="dtype"):
        BatchEngine(engines[("float32", "none")], dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype must be"):
        Engine(tiny=True, dtype="float16")
    with pytest.raises(ValueError, match="quantize must be"):
        Engine(tiny=True, quantize="int4")
    with pytest.raises(ValueError, match="needs dtype float32"):
        Engine(tiny=True, dtype="bfloat16", quantize="int8")


def test_accuracy_command_prints_a_table(capsys):
    assert accuracy.main(["--tiny", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "int8" in out and "greedy agree" in out
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["--tiny", "--full"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_draw_follows_the_softmax_and_each_rows_own_generator(engines, monkeypatch):
    """``Engine.draw``: tokens distributed as softmax(logits / temperature) over the top-k likeliest, a token
    of probability 0 or outside the top k never drawn, one uniform per row and step from the row's own
    generator, whatever the other rows are."""
    e = engines[("float32", "none")]
    assert e.top_k == 50 and e.identity()["top_k"] == 50
    torch = e.torch
    logits = torch.tensor([[0.0, 1.0, -1.0, float("-inf"), 0.5]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([e.draw(logits, [g])[0] for _ in range(n)]), minlength=5)
    expected = e.probabilities(logits)[0] * n
    assert counts[3] == 0
    assert ((counts - expected).abs() <= 4 * expected.sqrt() + 1).all(), (counts, expected)
    monkeypatch.setattr(e, "top_k", 2)           # tokens 1 and 4 only, renormalised
    counts = torch.bincount(torch.tensor([e.draw(logits, [g])[0] for _ in range(n)]), minlength=5)
    expected = torch.zeros(5)
    expected[[1, 4]] = torch.softmax(logits[0, [1, 4]] / e.temperature, dim=0) * n
    assert counts[[0, 2, 3]].sum() == 0
    assert ((counts - expected).abs() <= 4 * expected.sqrt() + 1).all(), (counts, expected)
    monkeypatch.undo()
    rows = torch.randn(6, 50257, generator=torch.Generator().manual_seed(1)) * 3
    alone = [e.draw(rows[2:3], [g]) for g in [torch.Generator().manual_seed(7)] for _ in range(5)]
    mates = [torch.Generator().manual_seed(s) for s in range(6)]
    mates[2] = torch.Generator().manual_seed(7)
    together = [[e.draw(rows, mates)[2]] for _ in range(5)]
    assert together == alone
    mine, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    e.draw(rows[:1], [mine])
    torch.rand(1, generator=ref, dtype=torch.float64)
    assert torch.equal(mine.get_state(), ref.get_state())   # exactly one uniform per row and step
    with pytest.raises(RuntimeError, match="nan"):
        e.draw(torch.full((1, 5), float("nan")), [mine])
    top50 = set(torch.topk(rows[2], 50).indices.tolist())
    assert {e.draw(rows[2:3], [g])[0] for g in [torch.Generator().manual_seed(5)] for _ in range(200)} <= top50


@pytest.mark.parametrize("bad", [-1, 2.5, True, "50"])
def test_top_k_is_checked(bad):
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        Engine(tiny=True, top_k=bad)


def test_dtype_defaults_paper_float32_batching_and_serve_int8():
    """The paper's configurations stay float32; the batching presets and a bare `serve` take int8; an explicit
    other dtype drops a preset's int8."""
    from llm_psi.load.generator import parse_config
    from llm_psi.service.server import parse_serve
    precision = lambda c: (c.dtype, c.quantize)  # noqa: E731
    for label in ("baseline", "cgroups", "psi"):
        assert precision(parse_config(["--config", label])) == ("float32", "none")
        assert precision(parse_serve(["--config", label])[0]) == ("float32", "none")
    assert precision(parse_config([])) == ("float32", "none")
    for label in ("batch", "batch_psi"):
        assert precision(parse_config(["--config", label])) == ("float32", "int8")
    # batch_fp32 separates batching from precision: batch's batching in float32, in the controllers' grid
    fp32 = parse_config(["--config", "batch_fp32"])
    assert precision(fp32) == ("float32", "none") and fp32.batching == "dynamic"
    from bench.controllers import CONTROLLERS
    assert {"batch", "batch_fp32", "limit1"} <= set(CONTROLLERS)
    assert precision(parse_serve([])[0]) == ("float32", "int8") and parse_serve([])[0].config == "baseline"
    assert precision(parse_serve(["--dtype", "bfloat16"])[0]) == ("bfloat16", "none")
    assert precision(parse_config(["--config", "batch", "--dtype", "bfloat16"])) == ("bfloat16", "none")
    assert precision(parse_config(["--config", "batch", "--quantize", "none"])) == ("float32", "none")


def test_bf16_without_a_onednn_kernel_falls_back(engines, monkeypatch):
    """On a CPU where oneDNN has no bfloat16 inner product (AVX2 only), a bfloat16 model's layers take torch's
    own kernels, and the batched step gives the same logits as on oneDNN's (where this CPU has it)."""
    from llm_psi.engine.net import DecodeBatch, Forward
    e = engines[("bfloat16", "none")]
    torch = e.torch
    plain = net.onednn_linear

    def without_bf16(dtype="float32"):
        return None if dtype == "bfloat16" else plain(dtype)
    monkeypatch.setattr(net, "onednn_linear", without_bf16)
    fallback = Forward(e.model)
    assert fallback._dnn_model is None
    ids = e.encode(PROMPT).repeat(2, 1)
    with torch.inference_mode():
        db = DecodeBatch(fallback)
        logits, rows = db.prefill_many(ids)
        db.add(*rows)
        step = db.step(logits.argmax(-1, keepdim=True))
    assert step.shape[0] == 2 and step.dtype == torch.float32 and torch.isfinite(step).all()
    monkeypatch.setattr(net, "onednn_linear", plain)
    if plain("bfloat16") is not None:
        with torch.inference_mode():
            db = DecodeBatch(Forward(e.model))
            logits2, rows = db.prefill_many(ids)
            db.add(*rows)
            assert (db.step(logits2.argmax(-1, keepdim=True)) - step).abs().max().item() < 0.05

"""The engines: exact token counts, reproducible sampling, the real tokenizer and architecture."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llm_psi.engine.loop import ENGINES, Engine, Interrupted, make_engine, resolve_threads


@pytest.fixture(scope="module")
def tiny():
    return Engine(tiny=True, seed=0)


@pytest.fixture(scope="module")
def engines(tiny):
    return {"loop": tiny, "generate": make_engine("generate", tiny=True, seed=0),
            "ort": make_engine("ort", tiny=True, seed=0)}


class StopOnCall:
    """A stand-in for threading.Event whose is_set() turns true at its n-th call."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def is_set(self):
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("kind", ENGINES)
def test_exact_tokens_and_timestamps(engines, kind):
    g = engines[kind].generate("Explain the theory of relativity.", 12, seed=3)
    assert g.output_tokens == 12 and len(g.token_times) == 12 and g.prompt_tokens == 7 and g.text
    assert g.t_start <= g.t_first_token == g.token_times[0] <= g.t_end == g.token_times[-1]
    assert g.token_times == sorted(g.token_times)
    assert engines[kind].identity()["engine"] == kind


@pytest.mark.parametrize("kind", ENGINES)
def test_eos_does_not_end_generation_early(engines, kind):
    """With EOS made the likeliest token at every step, generation still yields every token asked for."""
    e = engines[kind]
    eos = e.tokenizer.eos_token_id
    hook = e.model.lm_head.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, e.torch.tensor([eos]), 1e4))
    try:
        g = e.generate("Hello there", 6, seed=0)
    finally:
        hook.remove()
    assert g.output_tokens == 6 and len(g.token_times) == 6


@pytest.mark.parametrize("kind", ENGINES)
def test_same_seed_same_tokens(engines, kind):
    e = engines[kind]
    a = e.generate("Tell a story about a lost robot.", 10, seed=7)
    b = e.generate("Tell a story about a lost robot.", 10, seed=7)
    c = e.generate("Tell a story about a lost robot.", 10, seed=8)
    assert a.text == b.text
    assert a.text != c.text  # 10 tokens from a 50257-way sample: a collision would be astronomically rare


def test_loop_engine_concurrent_tokens_match_sequential(tiny):
    """Each request of the loop engine samples from its own seeded generator, so four requests at once get the
    tokens each gets alone. Draws from one generator shared by the requests would interleave and differ."""
    prompts = ["Hello there", "Why is the sky blue?", "Tell a story about a lost robot.", "A"]
    seeds = [101, 202, 303, 404]
    alone = [tiny.generate(p, 40, seed=s).text for p, s in zip(prompts, seeds)]
    together = threading.Barrier(len(prompts))

    def one(prompt, seed):
        together.wait()
        return tiny.generate(prompt, 40, seed=seed)

    with ThreadPoolExecutor(len(prompts)) as pool:
        gens = list(pool.map(one, prompts, seeds))
    assert max(g.t_start for g in gens) < min(g.t_end for g in gens)  # the four were in flight at once
    assert [g.text for g in gens] == alone


def test_real_gpt2_tokenizer(tiny):
    assert tiny.encode("Hello world").tolist() == [[15496, 995]]


@pytest.mark.parametrize("kind", ENGINES)
def test_stop_event_interrupts(engines, kind):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        engines[kind].generate("Why is the sky blue during the day?", 5, seed=0, stop=stop)


@pytest.mark.parametrize("kind", ENGINES)
def test_stop_mid_generation_interrupts(engines, kind):
    stop = StopOnCall(4)
    with pytest.raises(Interrupted):
        engines[kind].generate("Why is the sky blue during the day?", 50, seed=0, stop=stop)
    assert stop.calls == 4  # checked between tokens, and not once more after raising


def test_bad_arguments(engines):
    for e in engines.values():
        with pytest.raises(ValueError):
            e.generate("x" * 30, 0)
    with pytest.raises(ValueError):
        Engine(tiny=True, temperature=0)
    with pytest.raises(ValueError):
        resolve_threads("0")
    with pytest.raises(ValueError, match="loop, generate"):
        make_engine("beam", tiny=True)


@pytest.mark.slow
@pytest.mark.model
def test_124m_architecture():
    e = Engine(seed=0)
    ident = e.identity()
    assert ident["n_params"] == 124_439_808
    assert ident["config"] == {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257}
    assert e.generate("What causes the seasons on Earth?", 3, seed=0).output_tokens == 3

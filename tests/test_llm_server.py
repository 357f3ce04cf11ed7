"""The engine: exact token counts, reproducible sampling, the real tokenizer and architecture."""
import threading

import pytest

from llm_server import Engine, Interrupted, resolve_threads


@pytest.fixture(scope="module")
def tiny():
    return Engine(tiny=True, seed=0)


def test_exact_tokens_and_timestamps(tiny):
    g = tiny.generate("Explain the theory of relativity.", 12, seed=3)
    assert g.output_tokens == 12 and len(g.token_times) == 12
    assert g.t_start <= g.t_first_token == g.token_times[0] <= g.t_end == g.token_times[-1]
    assert g.token_times == sorted(g.token_times)


def test_same_seed_same_tokens(tiny):
    a = tiny.generate("Tell a story about a lost robot.", 10, seed=7)
    b = tiny.generate("Tell a story about a lost robot.", 10, seed=7)
    c = tiny.generate("Tell a story about a lost robot.", 10, seed=8)
    assert a.text == b.text
    assert a.text != c.text  # 10 tokens from a 50257-way sample: a collision would be astronomically rare


def test_real_gpt2_tokenizer(tiny):
    assert tiny.encode("Hello world").tolist() == [[15496, 995]]


def test_stop_event_interrupts(tiny):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        tiny.generate("Why is the sky blue during the day?", 5, seed=0, stop=stop)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError):
        tiny.generate("x" * 30, 0)
    with pytest.raises(ValueError):
        Engine(tiny=True, temperature=0)
    with pytest.raises(ValueError):
        resolve_threads("0")


def test_124m_architecture():
    e = Engine(seed=0)
    ident = e.identity()
    assert ident["n_params"] == 124_439_808
    assert ident["config"] == {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257}
    assert e.generate("What causes the seasons on Earth?", 3, seed=0).output_tokens == 3

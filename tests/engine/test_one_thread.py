"""engine.one_thread: the engine is built and every request served on one thread, one at a time, in order."""
import threading

import pytest

from llm_psi.engine.one_thread import OneThread


class Recorder:
    def __init__(self):
        self.built_on = threading.get_ident()
        self.calls, self.busy, self.overlap = [], False, False

    def generate(self, prompt, n, seed=0, stop=None, on_token=None):
        self.overlap |= self.busy
        self.busy = True
        try:
            if prompt == "bad":
                raise ValueError("bad prompt")
            self.calls.append((prompt, threading.get_ident()))
            return prompt.upper()
        finally:
            self.busy = False

    def identity(self):
        return {"engine": "fake"}


def test_built_and_served_on_one_thread_one_at_a_time():
    eng = OneThread(Recorder)
    inner = eng.engine
    assert inner.built_on != threading.get_ident()
    out = {}
    callers = [threading.Thread(target=lambda i=i: out.setdefault(i, eng.generate(f"p{i}", 3))) for i in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert out == {i: f"P{i}" for i in range(6)}
    assert {tid for _, tid in inner.calls} == {inner.built_on} and not inner.overlap
    with pytest.raises(ValueError, match="bad prompt"):   # the caller gets its own error; the thread goes on
        eng.generate("bad", 1)
    assert eng.generate("ok", 1) == "OK" and eng.identity() == {"engine": "fake", "engine_thread": "one"}
    eng.close()
    assert not eng._thread.is_alive()


def test_a_failing_build_raises_in_the_caller():
    def broken():
        raise RuntimeError("no model")
    with pytest.raises(RuntimeError, match="no model"):
        OneThread(broken)

"""The paper's server loop: one thread builds the engine and runs every request, one at a time, in order.

The paper's ``llm_server.py`` loads the model and calls ``generate`` in its main thread, for one prompt after
another (its stdin loop); the artifact's timestamps show one request at a time at every concurrency. Which
thread makes the calls matters to OpenMP, not just their order: with ``OMP_WAIT_POLICY`` unset (the paper's
setting), a ``generate`` call on the thread that built the model cost several times the CPU of the same call
on a second thread in a quick unconstrained probe on this host, and with ``passive`` the two were equal: the
second thread's calls barely let the workers spin. *A guess at why:* libgomp gives every thread that opens
parallel regions a worker pool of its own, and once it manages more threads than there are CPUs it cuts the
spin of idle workers to a throttled ~100 rounds. Our load generator and HTTP server call the engine from
worker threads, which would explain why our ``cgroups`` cell took 0.59-0.78 of the paper's code's time per
request (issue 30). ``OneThread`` gives the paper's configurations the paper's threading, measured against a
re-creation of the paper's server by ``python -m bench.paper_cost``: every torch call of the engine, its
construction included, on one thread.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


class OneThread:
    """``OneThread(factory)``: ``factory()`` (an engine) is built on a thread of its own, which then runs each
    ``generate`` call, in arrival order, one at a time; callers wait for theirs. Everything else (``encode``,
    ``identity``, ...) is the engine's, called from the caller's thread (no parallel regions)."""

    def __init__(self, factory):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        built: Future = Future()
        self._thread = threading.Thread(target=self._serve, args=(factory, built), name="engine", daemon=True)
        self._thread.start()
        self.engine = built.result()   # re-raises the factory's error

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def identity(self) -> dict:
        return {**self.engine.identity(), "engine_thread": "one"}

    def generate(self, *args, **kwargs):
        done: Future = Future()
        self._jobs.put((done, args, kwargs))
        return done.result()

    def close(self) -> None:
        """End the engine's thread once the calls queued before this one are done."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self, factory, built: Future) -> None:
        try:
            engine = factory()
        except BaseException as e:
            built.set_exception(e)
            return
        built.set_result(engine)
        while (job := self._jobs.get()) is not None:
            done, args, kwargs = job
            try:
                done.set_result(engine.generate(*args, **kwargs))
            except BaseException as e:   # the caller raises it
                done.set_exception(e)

"""Batching engine on the tiny GPT-2 config: batched logits, token counts, joins, timestamps, failures, drain."""
import threading
import time

import pytest

from llm_psi.engine import batch as batch_engine
from llm_psi.engine.batch import BatchEngine, DecodeBatch
from llm_psi.engine.loop import Engine, Interrupted

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog near the river", "A",
           "Why is the sky blue?"]


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny=True, seed=0, torch_threads=1)


@pytest.fixture
def batched(engine):
    be = BatchEngine(engine, max_batch=8)
    yield be
    be.close()


def run_all(be, jobs):
    """Run (prompt, max_new_tokens, seed) jobs concurrently; return results (Generation or exception)."""
    out = [None] * len(jobs)

    def one(i, prompt, n, seed):
        try:
            out[i] = be.generate(prompt, n, seed=seed)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def start(be, prompt, n, seed=0, stop=None):
    """generate() in a background thread; returns (thread, result holder)."""
    box = {}

    def go():
        try:
            box["g"] = be.generate(prompt, n, seed=seed, stop=stop)
        except Exception as e:
            box["e"] = e

    t = threading.Thread(target=go)
    t.start()
    return t, box


def wait_for_tokens(be, n, timeout=10):
    """Until some running request has produced at least n tokens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(len(r.tokens) >= n for r in list(be._running)):
            return
        time.sleep(0.002)
    raise AssertionError("no request reached %d tokens" % n)


@pytest.mark.slow
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch"])
def test_batched_logits_match_unbatched(engine, onednn):
    """Sequences of different lengths, joining at different steps and leaving early, get the same prefill and
    step logits from the batch as from the Hugging Face forward run on each sequence alone."""
    torch, model = engine.torch, engine.model
    if onednn and batch_engine.onednn_linear() is None:
        pytest.skip("no oneDNN linear in this torch build")
    feed = lambda j, k: (31 * j + 7 * k + 3) % 1000  # noqa: E731 — fixed token fed at step k of sequence j
    steps = [6, 9, 4, 7]
    with torch.inference_mode():
        ref = []
        for j, p in enumerate(PROMPTS):
            res = model(input_ids=engine.encode(p), use_cache=True, logits_to_keep=1)
            cache, logits = res.cache, [res.logits[0, -1]]
            for k in range(steps[j]):
                res = model(input_ids=torch.tensor([[feed(j, k)]]), cache=cache, use_cache=True, logits_to_keep=1)
                cache = res.cache
                logits.append(res.logits[0, -1])
            ref.append(logits)
        batch = DecodeBatch(model, reserve=2, onednn=onednn)  # reserve 2: the buffers must grow
        rows, done, worst = [], {}, 0.0
        joins = {0: [0, 2], 2: [1], 5: [3]}
        for step in range(20):
            for j in joins.get(step, []):
                logits, row = batch.prefill(engine.encode(PROMPTS[j]))
                worst = max(worst, (logits[0] - ref[j][0]).abs().max().item())
                batch.add(row)
                rows.append(j)
                done[j] = 0
            logits = batch.step(torch.tensor([[feed(j, done[j])] for j in rows]))
            for i, j in enumerate(rows):
                done[j] += 1
                worst = max(worst, (logits[i] - ref[j][done[j]]).abs().max().item())
            finished = [i for i, j in enumerate(rows) if done[j] == steps[j]]
            batch.remove(finished)
            rows = [j for i, j in enumerate(rows) if i not in finished]
            if not rows:
                break
        assert done == {j: steps[j] for j in range(len(PROMPTS))}
        assert len(batch) == 0
        assert worst < 1e-4


def test_non_gpt2_model_refused(engine):
    class Other:
        config = type("C", (), {"model_type": "llama", "add_cross_attention": False})()
    with pytest.raises(ValueError, match="GPT-2"):
        DecodeBatch(Other())


def test_exact_token_counts_in_mixed_batch(batched):
    jobs = [(PROMPTS[i % 4], n, i) for i, n in enumerate([1, 3, 7, 12, 2, 5])]
    out = run_all(batched, jobs)
    for (prompt, n, _), g in zip(jobs, out):
        assert not isinstance(g, Exception), g
        assert g.output_tokens == n == len(g.token_times)
        assert g.prompt_tokens == batched.encode(prompt).shape[1]


def test_same_seed_same_tokens_as_unbatched_engine(engine, batched):
    """Holds here exactly; in general only while float differences of the batched matmul flip no sample."""
    jobs = [(p, 10, 100 + i) for i, p in enumerate(PROMPTS)]
    out = run_all(batched, jobs)
    assert [g.text for g in out] == [engine.generate(p, n, seed=s).text for p, n, s in jobs]


def test_same_seed_same_tokens_whatever_the_batch_mates(batched):
    """A request's tokens come from its own seeded generator: the same with other mates, other seeds."""
    one = run_all(batched, [(PROMPTS[0], 12, 42), (PROMPTS[1], 12, 1), (PROMPTS[2], 5, 2)])
    two = run_all(batched, [(PROMPTS[3], 3, 9), (PROMPTS[0], 12, 42), (PROMPTS[2], 12, 8), (PROMPTS[1], 7, 5)])
    assert one[0].text == two[1].text


def test_timestamps_consistent(batched):
    for g in run_all(batched, [(p, 6, i) for i, p in enumerate(PROMPTS)]):
        assert g.t_start <= g.t_first_token == g.token_times[0]
        assert g.token_times == sorted(g.token_times)
        assert g.t_end == g.token_times[-1]


def test_request_joins_while_another_runs(batched):
    t, box = start(batched, PROMPTS[1], 60)
    wait_for_tokens(batched, 3)
    late = batched.generate(PROMPTS[0], 4, seed=1)
    t.join()
    first = box["g"]
    assert first.output_tokens == 60 and late.output_tokens == 4
    assert first.t_first_token < late.t_start and late.t_end < first.t_end  # joined mid-run, left early


def test_max_batch_caps_running_sequences(engine):
    be = BatchEngine(engine, max_batch=2)
    try:
        out = run_all(be, [(p, 5, i) for i, p in enumerate(PROMPTS)])
    finally:
        be.close()
    spans = [(g.t_start, g.t_end) for g in out]
    for a, _ in spans:  # running at the moment a request joins: at most max_batch, itself included
        assert sum(s <= a <= e for s, e in spans) <= 2


def test_failing_requests_do_not_take_batch_mates_down(engine, batched):
    t, box = start(batched, PROMPTS[1], 40)
    wait_for_tokens(batched, 2)
    too_long = "word " * (engine.model.config.n_positions + 10)
    with pytest.raises(ValueError, match="positions"):
        batched.generate(too_long, 5)
    with pytest.raises(ValueError, match="empty"):
        batched.generate("", 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        batched.generate(PROMPTS[0], 0)
    t.join()
    assert box["g"].output_tokens == 40


def test_prefill_failure_is_isolated(engine, batched, monkeypatch):
    """An exception inside one request's prefill fails that request only."""
    t, box = start(batched, PROMPTS[1], 40)
    wait_for_tokens(batched, 2)
    real = engine.sample

    def broken(logits, generator):
        if generator.initial_seed() == 666:
            raise RuntimeError("boom")
        return real(logits, generator)

    monkeypatch.setattr(engine, "sample", broken)
    with pytest.raises(RuntimeError, match="boom"):
        batched.generate(PROMPTS[0], 5, seed=666)
    assert batched.generate(PROMPTS[2], 3, seed=1).output_tokens == 3
    t.join()
    assert box["g"].output_tokens == 40


def test_stop_event_removes_only_its_request(batched):
    stop = threading.Event()
    t1, stopped = start(batched, PROMPTS[0], 200, stop=stop)
    t2, mate = start(batched, PROMPTS[1], 30)
    wait_for_tokens(batched, 2)
    stop.set()
    t1.join(timeout=10)
    t2.join(timeout=10)
    assert isinstance(stopped.get("e"), Interrupted)
    assert mate["g"].output_tokens == 30


def test_decode_step_failure_fails_that_step_only(engine, batched, monkeypatch):
    """A batched step that raises cannot be pinned on one row: its requests fail; the scheduler serves on."""
    real, calls = DecodeBatch.step, []

    def flaky(self, input_ids):
        calls.append(len(self))
        if len(calls) == 3:
            raise RuntimeError("step boom")
        return real(self, input_ids)

    monkeypatch.setattr(DecodeBatch, "step", flaky)
    out = run_all(batched, [(PROMPTS[0], 10, 1)])
    assert isinstance(out[0], RuntimeError) and "step boom" in str(out[0])
    assert batched.generate(PROMPTS[1], 6, seed=2).output_tokens == 6


@pytest.mark.slow
def test_close_drains_then_refuses(engine):
    be = BatchEngine(engine, max_batch=2)
    threads = [start(be, p, 150, seed=i) for i, p in enumerate(PROMPTS)]
    deadline = time.monotonic() + 10
    while len(be._queue) + len(be._running) < len(PROMPTS) and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert be._queue, "close() should find requests still queued"
    be.close()  # returns after every queued and running request has finished
    assert not be._thread.is_alive()
    for t, box in threads:
        t.join(timeout=1)
        assert box["g"].output_tokens == 150
    with pytest.raises(RuntimeError, match="closed"):
        be.generate(PROMPTS[0], 2)


def test_identity_and_delegation(engine, batched):
    ident = batched.identity()
    assert ident["batching"] == "dynamic" and ident["max_batch"] == 8
    assert batched.tokenizer is engine.tokenizer
    assert batched.encode("Hi").shape == engine.encode("Hi").shape


def test_request_generator_batch_config(tmp_path, fake_quota):
    import pandas as pd
    from llm_psi.load import generator as request_generator
    out = tmp_path / "batch_c3.csv"
    rc = request_generator.main(["--config", "batch", "--tiny", "--concurrency", "3", "--num-requests", "5",
                                 "--max-new-tokens", "4", "--spacing-ms", "0", "--no-warmup", "--quiet",
                                 "--torch-threads", "1", "--output", str(out)])
    assert rc == 0
    df = pd.read_csv(out)
    assert (df["status"] == "ok").all() and (df["output_tokens"] == 4).all() and len(df) == 5


def test_bench_batching_prints_table_and_json(capsys):
    import json
    from bench import batching as bench_batching
    assert bench_batching.main(["--tiny", "--tokens", "3", "--batches", "1", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert [r["batch"] for r in result["rows"]] == [1, 2] and result["torch_threads"] == 1
    assert [r["tokens"] for r in result["rows"]] == [3, 6] and result["rows"][0]["cpu_gain"] == 1.0
    with pytest.raises(SystemExit) as exc:
        bench_batching.main(["--batches", "0"])
    assert exc.value.code == 2

"""bench.compile on the tiny config: the compiled decode step gives the eager step's logits (or the run says
why torch.compile failed), one JSON row per batch size; bad values exit 2."""
import json

import pytest

from bench import compile as bc
from conftest import run_script


def test_compiled_parts_equal_the_eager_block():
    import torch
    from llm_psi.engine.loop import make_engine
    from llm_psi.engine.net import Forward
    engine = make_engine("loop", tiny=True, seed=0, torch_threads=1)
    eager, plain = Forward(engine.model), Forward(engine.model)
    plain.blocks = bc.compiled_blocks(plain, bc.dense_parts())      # the same functions, not compiled
    a, b = bc.decode(engine, eager, 3, 2), bc.decode(engine, plain, 3, 2)
    assert a[1].shape == b[1].shape and torch.allclose(a[1], b[1], atol=1e-4)


@pytest.mark.slow
def test_tiny_run_prints_one_row_per_batch():
    proc = run_script("bench.compile", "--tiny", "--batches", "1 2", "--tokens", 2, "--repeats", 1, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["eager_tokens_per_cpu_s"] > 0 for r in rows)
    for r in rows:   # compiled and equal, or a stated failure
        assert r["failure"] or (r["compiled_tokens_per_cpu_s"] > 0 and r["max_abs_logit_diff"] < 1e-3)


@pytest.mark.parametrize("args", [["--batches", "0"], ["--batches", ""], ["--tokens", "0"], ["--repeats", "x"]])
def test_bad_values_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        bc.main(args)
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1

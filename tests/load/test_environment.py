"""The cell's environment record: versions without importing torch or transformers; torch's thread counts
where the process runs torch."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = ("import json, sys{pre}; from llm_psi.load.environment import environment; e = environment({{}}); "
         "print(json.dumps([e['versions'], e['torch_threads'], 'torch' in sys.modules, "
         "'transformers' in sys.modules, e['cpu_simd'], e['git_commit'] is not None]))")


def probe(pre: str = ""):
    out = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out)


def test_a_client_process_records_versions_without_importing_torch():
    versions, threads, torch_loaded, transformers_loaded, simd, has_commit = probe()
    assert not torch_loaded and not transformers_loaded and threads is None
    assert versions["torch"].startswith("2.") and versions["transformers"] and versions["numpy"]
    assert isinstance(simd, list) and has_commit


@pytest.mark.slow    # imports torch in a fresh process
def test_an_engine_process_records_its_torch_threads():
    versions, threads, torch_loaded, _, _, _ = probe("; import torch; torch.set_num_threads(1)")
    assert torch_loaded and threads == 1
    import importlib.metadata
    assert versions["torch"] == importlib.metadata.version("torch")

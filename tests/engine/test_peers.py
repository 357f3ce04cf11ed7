"""llm_psi.engine.peers: the peer engines run our seeded tiny weights, exactly N tokens per sequence; the ONNX
graphs compute the same logits as the PyTorch model. Skipped, with the reason, where a peer's package is absent
(pip install -r bench/requirements-peers.txt)."""
import importlib.util

import numpy as np
import pytest

from llm_psi.engine import peers

IDS = [18438, 391, 262, 4583, 286, 44449, 13]   # "Explain the theory of relativity."
MISSING = {"onnxruntime": "onnxruntime", "ctranslate2": "ctranslate2"}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LLM_PSI_PEER_CACHE", str(tmp_path_factory.getbasetemp() / "peer-cache"))


def need(name):
    module = MISSING.get(name)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (bench/requirements-peers.txt)")


@pytest.mark.parametrize("name, dtype, quantize", [(n, d, q) for n, s in peers.SETTINGS.items() for d, q in s])
def test_every_peer_setting_makes_exactly_n_tokens_per_sequence(name, dtype, quantize):
    need(name)
    try:
        peer = peers.make_peer(name, tiny=True, dtype=dtype, quantize=quantize)
    except peers.PeerUnavailable as e:
        if "llm_psi.engine.net" not in str(e):
            raise
        pytest.skip(str(e))   # hf-generate int8, before the engine has its precisions
    assert peer.generate_batch(IDS, 3, 4, seed=1) == 12
    assert peer.generate_batch(IDS, 1, 1, seed=2) == 1


def test_onnx_graphs_give_the_torch_models_logits():
    need("onnxruntime")
    import torch
    from transformers import GPT2LMHeadModel
    peer = peers.make_peer("onnxruntime", tiny=True)
    model = GPT2LMHeadModel.from_pretrained(peers.hf_dir(True)).eval()
    seq = IDS + [100, 200]
    with torch.inference_mode():
        want = model(torch.tensor([seq, seq])).logits.numpy()
    logits, *present = peer.prefill.run(None, {"input_ids": np.array([IDS, IDS], dtype=np.int64)})
    np.testing.assert_allclose(logits, want[:, len(IDS) - 1], atol=1e-4)
    for step, token in enumerate(seq[len(IDS):]):
        feed = dict(zip(peer.past_names, present), input_ids=np.array([[token], [token]], dtype=np.int64))
        logits, *present = peer.decode.run(None, feed)
        np.testing.assert_allclose(logits, want[:, len(IDS) + step], atol=1e-4)
    assert present[0].shape[2] == len(seq)


def test_unsupported_settings_and_names_are_refused():
    with pytest.raises(peers.PeerUnavailable, match="hf-generate"):
        peers.make_peer("hf-generate", tiny=True, dtype="bfloat16", quantize="int8")
    with pytest.raises(ValueError, match="peer must be one of"):
        peers.make_peer("vllm", tiny=True)


def test_top_k_sampling_stays_in_the_top_k():
    rng = np.random.default_rng(0)
    logits = np.tile(np.arange(100, dtype=np.float32), (4, 1))
    picks = np.concatenate([peers.sample_top_k(logits, rng, k=5) for _ in range(50)])
    assert set(picks) <= {95, 96, 97, 98, 99} and len(set(picks)) > 1
    assert list(peers.sample_top_k(logits, rng, k=1)) == [99] * 4

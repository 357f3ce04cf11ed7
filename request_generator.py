#!/usr/bin/env python3
"""The paper's request generator: one cell (config x concurrency), in-process or against a running service.

A door into `llm_psi.load.generator`; `python request_generator.py --help` lists every option."""
import sys

from llm_psi.load.generator import main

if __name__ == "__main__":
    sys.exit(main())

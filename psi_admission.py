#!/usr/bin/env python3
"""The paper's PSI admission controller: `--show` prints every pressure source, or run one gated request.

A door into `llm_psi.control.psi`; `python psi_admission.py --help` lists every option."""
import sys

from llm_psi.control.psi import main

if __name__ == "__main__":
    sys.exit(main())

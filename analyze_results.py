#!/usr/bin/env python3
"""Table I, intervals, figures and paper.pdf, regenerated from the cells' files.

A door into `llm_psi.analysis.analyze`; `python analyze_results.py --help` lists every option."""
import sys

from llm_psi.analysis.analyze import main

if __name__ == "__main__":
    sys.exit(main())

"""python -m llm_psi.fleet: a fleet behind HAProxy until Ctrl-C (fleet.py)."""
import sys

from llm_psi.fleet.fleet import main

sys.exit(main())

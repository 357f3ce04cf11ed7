#!/usr/bin/env python3
"""The LLM service's command: GPT-2 loaded in-process, run as a resident HTTP service or for one cell.

    python llm_server.py serve --port 8000 --config psi       # the resident service (llm_psi.service.server)
    python llm_server.py --config baseline --concurrency 4    # one cell, as the paper's README shows
                                                              # (= request_generator.py -> runs/baseline_c4.csv)
`python llm_server.py serve --help` lists the service's options, `python llm_server.py --help` the cell's.
"""
import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        from llm_psi.service.server import main
        sys.exit(main(sys.argv[2:]))
    from llm_psi.load.generator import main
    sys.exit(main(sys.argv[1:]))

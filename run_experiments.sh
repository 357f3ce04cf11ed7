#!/usr/bin/env bash
# Baseline and cgroups-only sweeps (the paper's configurations 1 and 2).
#   sudo bash run_experiments.sh            # paper defaults: c = 1 2 4 8, 20 requests, 50 tokens
#   sudo bash run_experiments.sh --quick    # smoke run; --help for all options
set -euo pipefail
# shellcheck source=llm_psi/load/sweep_lib.sh disable=SC1091  # sweep_lib.sh is checked on its own too
source "$(dirname "${BASH_SOURCE[0]}")/llm_psi/load/sweep_lib.sh"
sweep_main "$(basename "$0")" "baseline cgroups" "$@"

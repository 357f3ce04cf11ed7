# shellcheck shell=bash
# Shared sweep driver, sourced by run_experiments.sh and run_psi_experiments.sh.
# The sourcing script calls: sweep_main SCRIPT_NAME "DEFAULT CONFIGS" "$@".
# One cell = one config at one concurrency: results/<config>_c<N>.csv + .json, written by
# request_generator.py. Limited configs run inside the service cgroup via `cgroup_lib.py run`.

SWEEP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SWEEP_CHILD=""          # PID of the running cell's process, while a cell runs
SWEEP_CHILD_LIMITED=0   # whether that cell runs in the service cgroup

sweep_usage() {
    cat <<EOF
Usage: sudo bash $SWEEP_SCRIPT [options]

Runs one cell per config and concurrency level: request_generator.py writes
<results-dir>/<config>_c<N>.csv and .json. Configs other than baseline run inside the
service cgroup (created and removed by cgroup_lib.py; root is needed for them).

Options (defaults reproduce the paper):
  --configs "LIST"         configs to run (default: "$SWEEP_DEFAULT_CONFIGS")
  --concurrency "LIST"     concurrency levels (default: "1 2 4 8")
  --num-requests N         requests per trial (default: 20)
  --max-new-tokens N       tokens per request (default: 50)
  --trials N               trials per cell (default: 1)
  --results-dir DIR        output directory (default: results)
  --cgroup-name NAME       service cgroup name (default: llm_service)
  --cpu-quota PERCENT      CPU limit in percent of one CPU (default: 50)
  --cpu-period-us N        CPU period (default: 100000)
  --memory-max SIZE        memory limit, e.g. 4G (default: 4G)
  --model PATH_OR_ID       pretrained weights (passed to the generator)
  --tiny                   tiny GPT-2 config (tests)
  --quick                  smoke run: concurrency "1 2", 4 requests, 8 tokens
  -h, --help               this help

Environment: PYTHON (interpreter; else .venv/bin/python beside this script, else python3),
SWEEP_GENERATOR (generator script; default request_generator.py beside this script).
EOF
}

sweep_die() {
    echo "$SWEEP_SCRIPT: error: $*" >&2
    exit 2
}

sweep_need_int() {  # NAME VALUE: VALUE must be a positive integer
    [[ $2 =~ ^[1-9][0-9]*$ ]] || sweep_die "$1 must be a positive integer, got '$2'"
}

sweep_parse_args() {
    unset CONCURRENCY NUM_REQUESTS MAX_NEW_TOKENS   # defaults depend on --quick; set below
    CONFIGS=$SWEEP_DEFAULT_CONFIGS TRIALS=1
    RESULTS_DIR=results CGROUP_NAME=llm_service CPU_QUOTA=50 CPU_PERIOD_US=100000 MEMORY_MAX=4G
    MODEL="" TINY=0 QUICK=0
    while (($#)); do
        case $1 in
            -h | --help) sweep_usage; exit 0 ;;
            --tiny) TINY=1; shift; continue ;;
            --quick) QUICK=1; shift; continue ;;
            --configs | --concurrency | --num-requests | --max-new-tokens | --trials | --results-dir | \
                --cgroup-name | --cpu-quota | --cpu-period-us | --memory-max | --model)
                (($# >= 2)) || sweep_die "$1 needs a value" ;;
            *) sweep_die "unknown option '$1' (see --help)" ;;
        esac
        case $1 in
            --configs) CONFIGS=$2 ;;
            --concurrency) CONCURRENCY=$2 ;;
            --num-requests) NUM_REQUESTS=$2 ;;
            --max-new-tokens) MAX_NEW_TOKENS=$2 ;;
            --trials) TRIALS=$2 ;;
            --results-dir) RESULTS_DIR=$2 ;;
            --cgroup-name) CGROUP_NAME=$2 ;;
            --cpu-quota) CPU_QUOTA=$2 ;;
            --cpu-period-us) CPU_PERIOD_US=$2 ;;
            --memory-max) MEMORY_MAX=$2 ;;
            --model) MODEL=$2 ;;
        esac
        shift 2
    done
    if ((QUICK)); then
        : "${CONCURRENCY=1 2}" "${NUM_REQUESTS=4}" "${MAX_NEW_TOKENS=8}"
    else
        : "${CONCURRENCY=1 2 4 8}" "${NUM_REQUESTS=20}" "${MAX_NEW_TOKENS=50}"
    fi
    local c
    read -ra CONFIG_LIST <<<"$CONFIGS"
    read -ra LEVELS <<<"$CONCURRENCY"
    ((${#CONFIG_LIST[@]})) || sweep_die "--configs is empty"
    ((${#LEVELS[@]})) || sweep_die "--concurrency is empty"
    for c in "${LEVELS[@]}"; do sweep_need_int --concurrency "$c"; done
    sweep_need_int --num-requests "$NUM_REQUESTS"
    sweep_need_int --max-new-tokens "$MAX_NEW_TOKENS"
    sweep_need_int --trials "$TRIALS"
    sweep_need_int --cpu-period-us "$CPU_PERIOD_US"
    [[ $CPU_QUOTA =~ ^[0-9]+([.][0-9]+)?$ ]] || sweep_die "--cpu-quota must be a number, got '$CPU_QUOTA'"
    [[ $CGROUP_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || sweep_die "--cgroup-name must be letters, digits, _ . - only"
}

sweep_find_python() {
    local source
    if [[ -n ${PYTHON:-} ]]; then
        PY=$PYTHON source="\$PYTHON"
    elif [[ -x $SWEEP_DIR/.venv/bin/python ]]; then
        PY=$SWEEP_DIR/.venv/bin/python source="the .venv beside $SWEEP_SCRIPT"
    else
        PY=python3 source="python3 on PATH"
    fi
    command -v "$PY" >/dev/null || sweep_die "Python interpreter '$PY' not found (set PYTHON=/path/to/python)"
    echo "python: $PY ($source)"
}

sweep_load_configs() {  # fills LIMITED[config]=1|0 from the generator's --list-configs
    declare -gA LIMITED=()
    local name kind listing cfg known=""
    GENERATOR=${SWEEP_GENERATOR:-$SWEEP_DIR/request_generator.py}
    [[ -f $GENERATOR ]] || sweep_die "generator $GENERATOR not found"
    listing=$("$PY" "$GENERATOR" --list-configs) || sweep_die "$GENERATOR --list-configs failed"
    while read -r name kind; do
        [[ -n $name ]] || continue
        LIMITED[$name]=$([[ $kind == limited ]] && echo 1 || echo 0)
        known+=" $name"
    done <<<"$listing"
    for cfg in "${CONFIG_LIST[@]}"; do
        [[ -n ${LIMITED[$cfg]:-} ]] || sweep_die "unknown config '$cfg' (known:$known)"
    done
}

sweep_needs_cgroup() {
    local cfg
    for cfg in "${CONFIG_LIST[@]}"; do
        ((LIMITED[$cfg])) && return 0
    done
    return 1
}

sweep_on_signal() {  # SIGNAL STATUS: stop the running cell, remove the service cgroup, exit
    trap '' INT TERM HUP
    echo "$SWEEP_SCRIPT: $1 received; stopping the running cell" >&2
    if [[ -n $SWEEP_CHILD ]]; then
        kill -TERM "$SWEEP_CHILD" 2>/dev/null || true
        wait "$SWEEP_CHILD" || true
    fi
    if ((SWEEP_CHILD_LIMITED)); then
        "$PY" "$SWEEP_DIR/cgroup_lib.py" cleanup --name "$CGROUP_NAME" || true
    fi
    exit "$2"
}

sweep_run_cell() {  # CONFIG CONCURRENCY INDEX TOTAL
    local cfg=$1 c=$2 out="$RESULTS_DIR/$1_c$2.csv" rc=0 where="unlimited"
    local -a cmd=("$PY" "$GENERATOR" --config "$cfg" --concurrency "$c" --num-requests "$NUM_REQUESTS"
        --max-new-tokens "$MAX_NEW_TOKENS" --trials "$TRIALS" --output "$out" --quiet)
    if ((TINY)); then cmd+=(--tiny); fi
    if [[ -n $MODEL ]]; then cmd+=(--model "$MODEL"); fi
    if ((LIMITED[$cfg])); then
        where="in cgroup $CGROUP_NAME"
        cmd=("$PY" "$SWEEP_DIR/cgroup_lib.py" run --name "$CGROUP_NAME" --cpu-quota "$CPU_QUOTA"
            --cpu-period-us "$CPU_PERIOD_US" --memory-max "$MEMORY_MAX" --meta "${out%.csv}.json"
            -- "${cmd[@]}")
    fi
    echo "[$3/$4] $cfg c=$c ($where) -> $out"
    # In the background so that a signal to this script runs its trap at once.
    SWEEP_CHILD_LIMITED=${LIMITED[$cfg]}
    "${cmd[@]}" &
    SWEEP_CHILD=$!
    wait "$SWEEP_CHILD" || rc=$?
    SWEEP_CHILD="" SWEEP_CHILD_LIMITED=0
    ((rc == 0)) || { echo "$SWEEP_SCRIPT: cell $cfg c=$c failed (exit status $rc)" >&2; exit "$rc"; }
}

sweep_main() {
    SWEEP_SCRIPT=$1 SWEEP_DEFAULT_CONFIGS=$2
    shift 2
    sweep_parse_args "$@"
    sweep_find_python
    sweep_load_configs
    if sweep_needs_cgroup; then
        ((EUID == 0)) || sweep_die "must run as root to create the service cgroup for config(s) other than baseline; try: sudo bash $SWEEP_SCRIPT $*"
        local mode
        mode=$("$PY" "$SWEEP_DIR/cgroup_lib.py" detect) || exit 2
        echo "cgroups: $mode; limits: cpu $CPU_QUOTA% of one CPU (period $CPU_PERIOD_US us), memory $MEMORY_MAX"
    fi
    trap 'sweep_on_signal SIGINT 130' INT
    trap 'sweep_on_signal SIGTERM 143' TERM
    trap 'sweep_on_signal SIGHUP 129' HUP
    mkdir -p "$RESULTS_DIR"
    local cfg c index=0 total=$((${#CONFIG_LIST[@]} * ${#LEVELS[@]}))
    echo "sweep: configs \"$CONFIGS\", concurrency \"$CONCURRENCY\", $NUM_REQUESTS requests," \
        "$MAX_NEW_TOKENS tokens, $TRIALS trial(s) -> $RESULTS_DIR/"
    for cfg in "${CONFIG_LIST[@]}"; do
        for c in "${LEVELS[@]}"; do
            index=$((index + 1))
            sweep_run_cell "$cfg" "$c" "$index" "$total"
        done
    done
    echo "sweep done: $total cell(s) in $RESULTS_DIR/"
}

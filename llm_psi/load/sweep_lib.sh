# shellcheck shell=bash
# Shared sweep driver, sourced by run_experiments.sh and run_psi_experiments.sh.
# The sourcing script calls: sweep_main SCRIPT_NAME "DEFAULT CONFIGS" "$@".
# One cell = one config at one concurrency: <dir>/<config>_c<N>.csv + .json + _timeline.csv, written by
# request_generator.py one trial per run. Trials interleave: trial k of every cell, in a seeded random order,
# before trial k+1 of any, so that drift over the sweep spreads over every configuration alike. As root,
# every trial runs in a cgroup made for it by cgroup_lib.py: limited configs under the quota, baseline unlimited.

SWEEP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)  # the repository root
SWEEP_CHILD=""          # PID of the running trial's process, while one runs
SWEEP_CHILD_CGROUP=0    # whether that trial runs in a cgroup made by cgroup_lib.py
SWEEP_SERVER=""         # PID of the service (service mode), while one runs

sweep_usage() {
    cat <<EOF
Usage: sudo bash $SWEEP_SCRIPT [options]

Runs every trial of every cell (config x concurrency level) through request_generator.py, which writes
<results-dir>/<config>_c<N>.csv, .json and _timeline.csv. Trial k of every cell runs before trial k+1 of
any, in a random order drawn from --seed. As root each trial runs in a cgroup made for it by cgroup_lib.py:
limited configs under the limits below, baseline with no limits (its counters are then its own). Without
root only unlimited configs can run, outside any cgroup of their own.

Options (defaults reproduce the paper):
  --configs "LIST"         configs to run (default: "$SWEEP_DEFAULT_CONFIGS")
  --concurrency "LIST"     concurrency levels of every config (default: "1 2 4 8")
  --cells "LIST"           further cells as config:level, e.g. "limit1:1 limit1:8" (default: none)
  --num-requests N         requests per trial (default: 20)
  --max-new-tokens N       tokens per request (default: 50)
  --trials N               trials per cell (default: 1)
  --seed N                 seed of the run order (default: 0)
  --results-dir DIR        output directory (default: runs, git-ignored; the committed reproduction in
                           results/ is rewritten only with --results-dir results --force)
  --force                  replace cells that exist in the results directory
  --resume                 keep the finished trials of existing cells and run the missing ones
  --cgroup-name NAME       service cgroup name (default: llm_service)
  --cpu-quota PERCENT      CPU limit in percent of one CPU, > 0 (default: 50)
  --cpu-period-us N        CPU period, 1000..1000000 (default: 100000)
  --memory-max SIZE        memory limit, e.g. 4G (default: 4G)
  --engine loop|generate   our decode loop or Hugging Face generate() (default: loop)
  --mode in-process|service   in-process: the generator runs the service in its own process, inside the
                           cell's cgroup (the paper); service: llm_server.py serve alone runs in the
                           cell's cgroup and the generator sends it HTTP requests from outside (default:
                           in-process)
  --port N                 the service's port in service mode (default: 18000)
  --model PATH_OR_ID       pretrained weights (passed to the generator)
  --tiny                   tiny GPT-2 config (tests)
  --quick                  smoke run: concurrency "1 2", 4 requests, 8 tokens
  -h, --help               this help

Analyse the cells with: python analyze_results.py --results-dir <results-dir>
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
    CONFIGS=$SWEEP_DEFAULT_CONFIGS EXTRA_CELLS="" TRIALS=1 SEED=0 FORCE=0 RESUME=0 ENGINE=loop
    RESULTS_DIR=runs CGROUP_NAME=llm_service CPU_QUOTA=50 CPU_PERIOD_US=100000 MEMORY_MAX=4G
    MODEL="" TINY=0 QUICK=0 MODE=in-process PORT=18000
    while (($#)); do
        case $1 in
            -h | --help) sweep_usage; exit 0 ;;
            --tiny) TINY=1; shift; continue ;;
            --quick) QUICK=1; shift; continue ;;
            --force) FORCE=1; shift; continue ;;
            --resume) RESUME=1; shift; continue ;;
            --configs | --concurrency | --cells | --num-requests | --max-new-tokens | --trials | --seed | \
                --results-dir | --cgroup-name | --cpu-quota | --cpu-period-us | --memory-max | --engine | --model | \
                --mode | --port)
                (($# >= 2)) || sweep_die "$1 needs a value" ;;
            *) sweep_die "unknown option '$1' (see --help)" ;;
        esac
        case $1 in
            --configs) CONFIGS=$2 ;;
            --concurrency) CONCURRENCY=$2 ;;
            --cells) EXTRA_CELLS=$2 ;;
            --num-requests) NUM_REQUESTS=$2 ;;
            --max-new-tokens) MAX_NEW_TOKENS=$2 ;;
            --trials) TRIALS=$2 ;;
            --seed) SEED=$2 ;;
            --results-dir) RESULTS_DIR=$2 ;;
            --cgroup-name) CGROUP_NAME=$2 ;;
            --cpu-quota) CPU_QUOTA=$2 ;;
            --cpu-period-us) CPU_PERIOD_US=$2 ;;
            --memory-max) MEMORY_MAX=$2 ;;
            --engine) ENGINE=$2 ;;
            --model) MODEL=$2 ;;
            --mode) MODE=$2 ;;
            --port) PORT=$2 ;;
        esac
        shift 2
    done
    if ((QUICK)); then
        : "${CONCURRENCY=1 2}" "${NUM_REQUESTS=4}" "${MAX_NEW_TOKENS=8}"
    else
        : "${CONCURRENCY=1 2 4 8}" "${NUM_REQUESTS=20}" "${MAX_NEW_TOKENS=50}"
    fi
    local c cell
    read -ra CONFIG_LIST <<<"$CONFIGS"
    read -ra LEVELS <<<"$CONCURRENCY"
    read -ra EXTRA <<<"$EXTRA_CELLS"
    ((${#CONFIG_LIST[@]} + ${#EXTRA[@]})) || sweep_die "--configs and --cells are both empty"
    ((${#LEVELS[@]})) || ((!${#CONFIG_LIST[@]})) || sweep_die "--concurrency is empty"
    for c in "${LEVELS[@]}"; do sweep_need_int --concurrency "$c"; done
    for cell in "${EXTRA[@]}"; do
        [[ $cell =~ ^[A-Za-z0-9_]+:[1-9][0-9]*$ ]] || sweep_die "--cells takes config:level items, got '$cell'"
    done
    sweep_need_int --num-requests "$NUM_REQUESTS"
    sweep_need_int --max-new-tokens "$MAX_NEW_TOKENS"
    sweep_need_int --trials "$TRIALS"
    sweep_need_int --cpu-period-us "$CPU_PERIOD_US"
    ((CPU_PERIOD_US >= 1000 && CPU_PERIOD_US <= 1000000)) ||
        sweep_die "--cpu-period-us must be within 1000..1000000, got '$CPU_PERIOD_US'"
    [[ $SEED =~ ^[0-9]+$ ]] || sweep_die "--seed must be an integer >= 0, got '$SEED'"
    [[ $CPU_QUOTA =~ ^[0-9]+([.][0-9]+)?$ && ! $CPU_QUOTA =~ ^0*([.]0*)?$ ]] ||
        sweep_die "--cpu-quota must be a number > 0, got '$CPU_QUOTA'"
    [[ $MEMORY_MAX =~ ^([1-9][0-9]*[KMGTkmgt]?|max)$ ]] ||
        sweep_die "--memory-max must be a size > 0 such as 4G, 512M or max, got '$MEMORY_MAX'"
    [[ $ENGINE == loop || $ENGINE == generate ]] || sweep_die "--engine must be loop or generate, got '$ENGINE'"
    [[ $MODE == in-process || $MODE == service ]] || sweep_die "--mode must be in-process or service, got '$MODE'"
    [[ $PORT =~ ^[1-9][0-9]{0,4}$ ]] || sweep_die "--port must be within 1..65535, got '$PORT'"
    ((PORT <= 65535)) || sweep_die "--port must be within 1..65535, got '$PORT'"
    [[ $CGROUP_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || sweep_die "--cgroup-name must be letters, digits, _ . - only"
    ((!FORCE || !RESUME)) || sweep_die "--force and --resume exclude each other"
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

sweep_load_configs() {  # fills LIMITED[config]=1|0 from the generator's --list-configs, and CELLS
    declare -gA LIMITED=()
    local name kind listing cfg c cell known=""
    GENERATOR=${SWEEP_GENERATOR:-$SWEEP_DIR/request_generator.py}
    [[ -f $GENERATOR ]] || sweep_die "generator $GENERATOR not found"
    listing=$("$PY" "$GENERATOR" --list-configs) || sweep_die "$GENERATOR --list-configs failed"
    while read -r name kind; do
        [[ -n $name ]] || continue
        LIMITED[$name]=$([[ $kind == limited ]] && echo 1 || echo 0)
        known+=" $name"
    done <<<"$listing"
    CELLS=()
    for cfg in "${CONFIG_LIST[@]}"; do
        for c in "${LEVELS[@]}"; do CELLS+=("$cfg:$c"); done
    done
    for cell in "${EXTRA[@]}"; do
        [[ " ${CELLS[*]} " == *" $cell "* ]] || CELLS+=("$cell")
    done
    for cell in "${CELLS[@]}"; do
        [[ -n ${LIMITED[${cell%%:*}]:-} ]] || sweep_die "unknown config '${cell%%:*}' (known:$known)"
    done
}

sweep_check_existing() {  # refuse before anything runs if a cell exists and neither --force nor --resume
    local cell stem found=()
    ((FORCE || RESUME)) && return 0
    for cell in "${CELLS[@]}"; do
        stem="$RESULTS_DIR/${cell%%:*}_c${cell##*:}"
        if [[ -e $stem.csv || -e $stem.json || -e ${stem}_timeline.csv ]]; then found+=("$stem.csv"); fi
    done
    ((${#found[@]} == 0)) || sweep_die "${#found[@]} cell(s) exist already (${found[0]} ...); --force replaces" \
        "them, --resume completes them, or choose another --results-dir"
}

sweep_plan() {  # prints "TRIAL CONFIG LEVEL" per run: round k holds trial k of every cell, shuffled
    "$PY" - "$SEED" "$TRIALS" "${CELLS[@]}" <<'PYTHON'
import random, sys
seed, trials, cells = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rng = random.Random(seed)
for k in range(1, trials + 1):
    order = list(cells)
    rng.shuffle(order)
    for cell in order:
        print(k, *cell.split(":"))
PYTHON
}

sweep_cleanup_cgroup() {
    "$PY" "$SWEEP_DIR/cgroup_lib.py" cleanup --name "$CGROUP_NAME" || true
}

sweep_on_signal() {  # SIGNAL STATUS: stop the running trial, remove its cgroup, exit
    trap '' INT TERM HUP
    echo "$SWEEP_SCRIPT: $1 received; stopping the running cell" >&2
    if [[ -n $SWEEP_CHILD ]]; then
        kill -TERM "$SWEEP_CHILD" 2>/dev/null || true
        wait "$SWEEP_CHILD" || true
    fi
    sweep_stop_server
    if ((SWEEP_CHILD_CGROUP)); then sweep_cleanup_cgroup; fi
    exit "$2"
}

sweep_stop_server() {  # SIGTERM drains the service; cgroup_lib.py run forwards it and removes the cgroup
    if [[ -n $SWEEP_SERVER ]]; then
        kill -TERM "$SWEEP_SERVER" 2>/dev/null || true
        wait "$SWEEP_SERVER" || true
        SWEEP_SERVER=""
    fi
}

sweep_run_trial() {  # TRIAL CONFIG LEVEL INDEX TOTAL
    local k=$1 cfg=$2 c=$3 out="$RESULTS_DIR/$2_c$3.csv" rc=0 where="unlimited" in_cgroup=0
    local -a cmd=("$PY" "$GENERATOR" --config "$cfg" --concurrency "$c" --num-requests "$NUM_REQUESTS"
        --max-new-tokens "$MAX_NEW_TOKENS" --trials "$TRIALS" --trial "$k" --run-index "$4"
        --engine "$ENGINE" --output "$out" --quiet)
    if ((FORCE && k == 1)); then cmd+=(--force); elif ((RESUME || k > 1)); then cmd+=(--resume); fi
    if ((TINY)); then cmd+=(--tiny); fi
    if [[ -n $MODEL ]]; then cmd+=(--model "$MODEL"); fi
    local -a cg=("$PY" "$SWEEP_DIR/cgroup_lib.py" run --name "$CGROUP_NAME" --meta "${out%.csv}.json")
    local -a served=("${cmd[@]}")  # what runs in the cell's cgroup: the generator, or the service alone
    if [[ $MODE == service ]]; then
        served=("$PY" "$SWEEP_DIR/llm_server.py" serve --config "$cfg" --port "$PORT" --engine "$ENGINE")
        if ((TINY)); then served+=(--tiny); fi
        if [[ -n $MODEL ]]; then served+=(--model "$MODEL"); fi
        cmd+=(--target "http://127.0.0.1:$PORT" --wait-ready-s 600)
    fi
    if ((LIMITED[$cfg])); then
        where="in cgroup $CGROUP_NAME" in_cgroup=1
        served=("${cg[@]}" --cpu-quota "$CPU_QUOTA" --cpu-period-us "$CPU_PERIOD_US" --memory-max "$MEMORY_MAX"
            -- "${served[@]}")
    elif ((EUID == 0)); then
        where="in unlimited cgroup $CGROUP_NAME" in_cgroup=1
        served=("${cg[@]}" --unlimited -- "${served[@]}")
    fi
    SWEEP_CHILD_CGROUP=$in_cgroup
    if [[ $MODE == service ]]; then  # the service in the background, the generator outside its cgroup
        where="service $where, generator outside it"
        "${served[@]}" &
        SWEEP_SERVER=$!
    else
        cmd=("${served[@]}")
    fi
    echo "[$4/$5] trial $k/$TRIALS $cfg c=$c ($where) -> $out   (sweep $((SECONDS / 60)) min so far)"
    # In the background so that a signal to this script runs its trap at once.
    "${cmd[@]}" &
    SWEEP_CHILD=$!
    wait "$SWEEP_CHILD" || rc=$?
    SWEEP_CHILD=""
    sweep_stop_server
    if ((rc != 0)); then
        echo "$SWEEP_SCRIPT: trial $k of $cfg c=$c failed (exit status $rc); finished trials are kept" >&2
        if ((in_cgroup)); then sweep_cleanup_cgroup; fi
        exit "$rc"
    fi
    SWEEP_CHILD_CGROUP=0
}

sweep_main() {
    SWEEP_SCRIPT=$1 SWEEP_DEFAULT_CONFIGS=$2
    shift 2
    sweep_parse_args "$@"
    sweep_find_python
    sweep_load_configs
    local cell needs_root=0
    for cell in "${CELLS[@]}"; do
        if ((LIMITED[${cell%%:*}])); then needs_root=1; fi
    done
    if ((needs_root)); then
        ((EUID == 0)) || sweep_die "must run as root to create the service cgroup for config(s) other than baseline; try: sudo bash $SWEEP_SCRIPT $*"
    fi
    if ((EUID == 0)); then
        local mode
        mode=$("$PY" "$SWEEP_DIR/cgroup_lib.py" detect) || exit 2
        echo "cgroups: $mode; limits: cpu $CPU_QUOTA% of one CPU (period $CPU_PERIOD_US us), memory $MEMORY_MAX"
    else
        echo "not root: unlimited cells run outside a cgroup of their own and record no cgroup counters"
    fi
    sweep_check_existing
    local -a plan
    mapfile -t plan < <(sweep_plan) || sweep_die "could not plan the run order"
    ((${#plan[@]} == ${#CELLS[@]} * TRIALS)) || sweep_die "could not plan the run order"
    trap 'sweep_on_signal SIGINT 130' INT
    trap 'sweep_on_signal SIGTERM 143' TERM
    trap 'sweep_on_signal SIGHUP 129' HUP
    mkdir -p "$RESULTS_DIR"
    echo "sweep ($MODE): cells \"${CELLS[*]}\", $NUM_REQUESTS requests, $MAX_NEW_TOKENS tokens, $TRIALS trial(s)" \
        "interleaved in random order (seed $SEED) -> $RESULTS_DIR/"
    local i line
    for i in "${!plan[@]}"; do
        read -ra line <<<"${plan[i]}"
        sweep_run_trial "${line[0]}" "${line[1]}" "${line[2]}" "$((i + 1))" "${#plan[@]}"
    done
    echo "sweep done: ${#plan[@]} trial(s) of ${#CELLS[@]} cell(s) in $RESULTS_DIR/;" \
        "analyse with: python analyze_results.py --results-dir $RESULTS_DIR"
}

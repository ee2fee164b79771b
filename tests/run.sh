#!/usr/bin/env bash
# The test command (README, "Test"; docs/testing.md): every test, every notebook, on any x86-64
# machine. Run from anywhere, in the environment of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

# The command sets the process settings on which the outputs depend, whatever the caller exported:
# the shipped pictures, TensorFlow's C++ logs off and TensorFlow's pools left to utils.setup().
# oneDNN's custom operations are off, as in the notebooks' setup cell, unless the caller sets
# TF_ENABLE_ONEDNN_OPTS=1 to run the whole command as on another kind of CPU; lane B always runs
# with the other setting. Each run's label names its setting.
onednn="${TF_ENABLE_ONEDNN_OPTS:-0}"
if [ "$onednn" = 0 ]; then
    other=1
elif [ "$onednn" = 1 ]; then
    other=0
else
    echo "tests/run.sh: TF_ENABLE_ONEDNN_OPTS must be 0 or 1, not '$onednn'" >&2
    exit 1
fi
export TF_ENABLE_ONEDNN_OPTS="$onednn" TF_CPP_MIN_LOG_LEVEL=3
unset TF_NUM_INTRAOP_THREADS TF_NUM_INTEROP_THREADS NBVAL_RUN_LABEL BN_SERIES_DATA

# The CPUs this process may use, whichever they are: two lanes run side by side, one CPU each
# (on a machine with one CPU, both lanes share it, one after the other).
read -r -a cpus <<< "$(python -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
if [ "${#cpus[@]}" -eq 0 ]; then
    echo "tests/run.sh: no usable CPU found (is python the environment's?)" >&2
    exit 1
fi
cpu_a=${cpus[0]}
cpu_b=${cpus[1]:-${cpus[0]}}
nbval=(--nbval --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg)
runs=output/notebook_runs
# Each run starts from the same state: no recorded outputs, and no rows that an earlier run of
# the retraining deep dive left for notebook 05 (05 runs before the deep dive in every run).
rm -rf "$runs" output/retraining_remedies.json

# 0. The Python code is formatted and lint-free (ruff.toml says which files).
ruff check .
ruff format --check .

# 1. On all CPUs: the unit and system tests, and every notebook compared with its stored outputs
#    (strictly where this machine reproduces the recording's arithmetic: tests/nbval_cpu.py).
NBVAL_RUN_LABEL="all-cpus-onednn$onednn" python -m pytest "${nbval[@]}" tests notebooks --ignore tests/test_binder_session.py --ignore tests/test_own_images.py

# 2. Lane A, one CPU: every notebook again, compared with the stored outputs and with step 1's run
#    (one machine gives the same outputs on one CPU and on all), then the drawn formats.
lane_a() {
    rm -f output/retraining_remedies.json
    NBVAL_RUN_LABEL="one-cpu-onednn$onednn" taskset -c "$cpu_a" python -m pytest "${nbval[@]}" notebooks || return
    python tests/compare_runs.py "$runs/all-cpus-onednn$onednn" "$runs/one-cpu-onednn$onednn" || return
    taskset -c "$cpu_a" python -m pytest tests/test_own_images.py -k formats
}
# 3. Lane B, one CPU: the notebooks as on another kind of CPU (with the other oneDNN setting,
#    kernels add in another order; the retraining deep dive's branch for other bits runs in the
#    picture tests), then the
#    Binder-like session and the photograph-like pictures.
lane_b() {
    TF_ENABLE_ONEDNN_OPTS="$other" NBVAL_RUN_LABEL="other-cpu-onednn$other" taskset -c "$cpu_b" python -m pytest "${nbval[@]}" notebooks --ignore notebooks/deep_dives/retraining_remedies.ipynb || return
    taskset -c "$cpu_b" python -m pytest tests/test_binder_session.py || return
    taskset -c "$cpu_b" python -m pytest tests/test_own_images.py -k photographs
}
if [ "${#cpus[@]}" -gt 1 ]; then
    lane_b & second=$!
    status=0
    lane_a || status=$?
    wait "$second" || status=$?
    exit "$status"
fi
lane_a
lane_b

#!/usr/bin/env bash
# The GPU proof of issue 19 as one command (the device calls: scripts/gpu_proof.md).
#
#   scripts/gpu_proof.sh carry                      # here, with the package index: build .carry/site.tar.xz,
#                                                   # what the GPU machine lacks, pinned to this venv's versions
#   scripts/gpu_proof.sh [bench/gpu_proof.py options]   # there: install .carry (when present), then run
#                                                   # pytest -m gpu, the packing bench and a 3-trial qsweep run
#   scripts/gpu_proof.sh --device cpu --model tiny-llama ...   # the CPU dry run (tests/test_gpu_proof.py)
#
# Results go to $OUT (the device tool's output folder) or to bench/results/proof: proof.json (the
# device named, each phase's figures and ok) and pytest_gpu.txt. The exit code is 0 only when every
# phase is ok. QSWEEP_CARRY (default .carry/site.tar.xz) is unpacked into QSWEEP_SITE (default
# /tmp/qsweep-site), once: an unchanged carry is not unpacked again on a machine that stayed warm.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == carry ]]; then
    shift
    exec "$PY" "$REPO/scripts/carry.py" "$@"
fi

started=$SECONDS
SITE="${QSWEEP_SITE:-/tmp/qsweep-site}"
CARRY="${QSWEEP_CARRY:-$REPO/.carry/site.tar.xz}"
if [[ -f "$CARRY" ]]; then
    "$PY" "$REPO/scripts/carry.py" --install "$CARRY" --site "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" QSWEEP_CARRY_SITE="$SITE"
fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
export QSWEEP_CACHE="${QSWEEP_CACHE:-/tmp/qsweep-cache}" RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray}"
# The install counts against the budget: of a 540 s call, 470 s for the proof leave room for a phase
# that overruns its share and for the last sweep's processes to leave the card.
budget=$(( ${QSWEEP_PROOF_BUDGET_S:-470} - (SECONDS - started) ))
cd "$REPO"
exec "$PY" bench/gpu_proof.py --out "${OUT:-$REPO/bench/results/proof}" --budget-s "$budget" "$@"

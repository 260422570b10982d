#!/usr/bin/env bash
# The GPU check of issue 20 (benchmarks/gpu_check.py): every CUDA-facing part of edgecl, one JSON + summary.
#
#   benchmarks/gpu_check.sh OUT               on a machine with one NVIDIA GPU (no network needed)
#   benchmarks/gpu_check.sh --cpu-dry-run OUT the same steps on the CPU with tiny sizes (part of make test)
#
# Runs edgecl from this working tree (PYTHONPATH). Packages the machine lacks (FastAPI, uvicorn, pydantic, ...)
# are installed, without an index, from the wheels in .gpu/wheels (`make gpu-wheels`, done beforehand where pip
# can download) into .gpu/site. Data: .gpu/data (`make gpu-data`) when present, else synthetic data.
# PYTHON picks the interpreter (default python3). Exit status: 0 when every step passed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dry=()
out=""
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) dry=(--cpu-dry-run) ;;
        -h | --help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) out="$arg" ;;
    esac
done
if [[ -z "$out" ]]; then
    echo "usage: $0 [--cpu-dry-run] OUT_DIR" >&2
    exit 2
fi

site="$repo/.gpu/site"
wheels="$repo/.gpu/wheels"
if ! "$python" -c 'import fastapi, uvicorn, python_multipart, pydantic, prometheus_client, confusable_homoglyphs' 2>/dev/null; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        whls=("$wheels"/*.whl)
        echo "installing ${#whls[@]} wheels from $wheels into $site"
        "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${whls[@]}"
    else
        echo "warning: serve's packages are missing and $wheels has no wheels (make gpu-wheels)" >&2
    fi
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$repo"
exec "$python" benchmarks/gpu_check.py ${dry[@]+"${dry[@]}"} "$out"

#!/usr/bin/env bash
# GPU benchmark of GPT-2 small (124M, configs/gpt2-124m.toml): tokens/s, MFU and peak memory of one full
# training step (bf16 autocast, fused AdamW, batch 16 x 1024 tokens), eager and with torch.compile, on one
# NVIDIA GPU; then the model tests. Meant for a fresh GPU machine that has a copy of the repository:
#
#     bash scripts/gpu_check.sh            # from the repository root; results in $OUT (default ./gpu-out)
#
# Python: $CHATFORGE_PYTHON if set; else .venv (reused if it exists, else made with python3.11 or python3
# and given torch==2.13.0 and `-e .` from the package index, which may be unreachable there); the first of
# .venv/bin/python, python3, python that imports torch is used, with src/ on PYTHONPATH, so a machine
# whose own python3 has a CUDA torch works offline. Each step has a timeout, and a failed step is
# reported without stopping the later ones. About 2-4 minutes; never more than $GPU_CHECK_BUDGET seconds
# (default 450) plus a few for the summary: each step's timeout is cut to what is left of that budget.
# Writes to $OUT: gpu_check.log (everything printed), gpt2-124m-eager.json, gpt2-124m-compile.json
# (bench/train_throughput.py --json).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
DEADLINE=$((START + ${GPU_CHECK_BUDGET:-450}))

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, report; sets STEP_OK=1|0, never fails
    local name=$1 limit=$2 t0=$SECONDS left=$((DEADLINE - SECONDS))
    shift 2
    STEP_OK=0
    echo
    if [ "$left" -lt 15 ]; then
        echo "== $name skipped: the ${GPU_CHECK_BUDGET:-450} s budget is spent"
        return 0
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo "== $name (timeout ${limit} s): $*"
    if timeout -k 10 "$limit" "$@"; then
        STEP_OK=1
        echo "== $name: ok in $((SECONDS - t0)) s"
    else
        echo "== $name failed (exit $?; 124 = timed out) after $((SECONDS - t0)) s"
    fi
}

echo "== gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm), results in $OUT"

# --- Python with torch -------------------------------------------------------------------------------
if [ -n "${CHATFORGE_PYTHON:-}" ]; then
    PY=$CHATFORGE_PYTHON
else
    if [ -x .venv/bin/python ]; then
        echo "== reusing .venv"
    else
        BASE=$(command -v python3.11 || command -v python3 || true)
        if [ -n "$BASE" ]; then
            step "make .venv with $BASE" 60 "$BASE" -m venv .venv
            if [ "$STEP_OK" = 1 ]; then
                step "pip install torch==2.13.0" 150 .venv/bin/python -m pip install -q --retries 0 --timeout 15 \
                    torch==2.13.0
                if [ "$STEP_OK" = 1 ]; then
                    step "pip install -e ." 60 .venv/bin/python -m pip install -q --retries 0 --timeout 15 -e .
                else
                    echo "== no torch from the package index (unreachable here?): looking for a python with torch"
                fi
            fi
        else
            echo "== no python3.11 or python3 to make .venv with"
        fi
    fi
    PY=""
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' 2>/dev/null; then
            PY=$(command -v "$candidate")
            break
        fi
    done
    if [ -z "$PY" ]; then
        echo "== no python here imports torch: nothing to benchmark"
        exit 1
    fi
fi
echo "== python: $PY"
"$PY" -c 'import sys, torch, chatforge
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")' \
    || echo "== import check failed"

# --- the GPU -----------------------------------------------------------------------------------------
step "nvidia-smi" 30 nvidia-smi

# --- throughput and MFU: eager first (a result even if compiling hangs), then torch.compile -----------
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "== torch sees no CUDA GPU here: the benchmark steps below fail at once"
fi
BENCH=(bench/train_throughput.py --config configs/gpt2-124m.toml --batch 16 --precision bf16 --steps 20 --warmup 5
       --device cuda)
step "gpt2-124m bf16 eager" 120 "$PY" "${BENCH[@]}" --json "$OUT/gpt2-124m-eager.json"
step "gpt2-124m bf16 torch.compile" 210 "$PY" "${BENCH[@]}" --compile --json "$OUT/gpt2-124m-compile.json"

# --- model tests (the CPU suite's, on this machine) -----------------------------------------------------
if "$PY" -c 'import pytest' 2>/dev/null; then
    step "pytest tests/test_model.py" 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_model.py
else
    echo "== pytest is not installed for $PY: tests skipped"
fi

# --- summary -----------------------------------------------------------------------------------------
echo
echo "== summary (total $((SECONDS - START)) s)"
"$PY" - "$OUT" <<'EOF' || echo "== summary failed"
import json
import pathlib
import sys

for name in ("eager", "compile"):
    path = pathlib.Path(sys.argv[1]) / f"gpt2-124m-{name}.json"
    if not path.exists():
        print(f"{name}: no result ({path.name} missing)")
        continue
    info = json.loads(path.read_text())
    for precision, r in info["results"].items():
        sheet = (f", MFU {r['mfu_datasheet']:.1%} of the {r['datasheet_part']} datasheet "
                 f"{r['datasheet_peak_flops'] / 1e12:.1f} TFLOP/s" if "mfu_datasheet" in r else "")
        memory = (f", peak memory {r['peak_memory_allocated_bytes'] / 2**30:.2f} GiB"
                  if "peak_memory_allocated_bytes" in r else "")
        print(f"{name} {precision} on {info.get('gpu', info['device'])}, torch {info['torch']}: "
              f"{r['tokens_per_s']:,.0f} tokens/s, step {r['step_ms_median']:.1f} ms, "
              f"MFU {r['mfu']:.1%} of the {r['mfu_denominator']} {r['peak_flops'] / 1e12:.1f} TFLOP/s{sheet}{memory}")
EOF

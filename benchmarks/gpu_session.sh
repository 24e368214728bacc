#!/usr/bin/env bash
# Issue #6's GPU measurements, most important first, inside one short device lease.
#
# A session is lent a GPU for about 15 minutes in all, start-up included, and one command may run
# 10 (the library's device README): the whole suite (`python benchmarks/run.py` on a GPU) takes
# longer, so this runs the entries that answer the issue's open questions first and skips the rest
# when its budget runs out:
#
#   1. resnet50 at 224 px, bf16, batch 256, against torch.compile (the 1.2x / 3,000 images/s floor)
#   2. one CIFAR epoch of resnet20 at batch 512 with device-resident data, against torch.compile
#   3. MobileNetV2's and EfficientNet-B0's depthwise layers: XLA's grouped convolution, cnnjax's
#      tap sum and torch's Conv2d(groups=C), forward and forward + backward
#   4. mobilenet_v2 and efficientnet_b0 at 224 px, bf16, batch 256, against torch.compile
#   5. one CIFAR epoch of resnet18 at batch 512
#   6. resnet20 and resnet18 at 32 px, batch 512, against torch.compile
#
# Each entry runs under `timeout`; its JSON goes to $OUT/results.jsonl (one object a line, with
# the entry's name and command), its output to $OUT/log.txt, the device and versions to
# $OUT/env.txt, the depthwise rows to $OUT/depthwise.json: four files, within what comes back
# from a device run. The device image has jax, flax, optax, orbax, chex and torch but not
# ml_collections, which cnnjax imports: carry its wheel (README "GPU session").
#
#   bash benchmarks/gpu_session.sh             # on the device: OUT=... BUDGET=seconds (default 500)
#   DRY_RUN=1 bash benchmarks/gpu_session.sh   # prints the plan and runs nothing
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cnnjax-gpu-session}
BUDGET=${BUDGET:-500}
PY=${PYTHON:-python3}
START=$SECONDS

if [ -z "${DRY_RUN:-}" ]; then
  mkdir -p "$OUT"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/cnnjax-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/cnnjax-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1
  # The CPU forms' branches are traced beside the GPU's (lax.platform_dependent) and would build
  # cnnjax's C++ kernels on this bare machine first (about 20 s). Exported for CUDA, resnet20's
  # gradient step holds the same operations either way, less 112 one-branch `case` wrappers.
  export CNNJAX_CPU_REWRITES=${CNNJAX_CPU_REWRITES:-off}
  {
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c 'import importlib.metadata as m
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "torch",
          "torchvision"):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, "missing")
import jax; print("devices", jax.devices())' 2>&1
  } > "$OUT/env.txt"
fi

# entry NAME SECONDS COMMAND...: runs COMMAND under `timeout` (at most what the budget has left),
# appending its JSON line (or an error object) to results.jsonl.
entry() {
  local name=$1 limit=$2 left
  shift 2
  if [ -n "${DRY_RUN:-}" ]; then
    echo "$name (${limit} s): $*"
    return
  fi
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 60 ]; then
    echo "[$name] skipped: ${left} s of the budget left" | tee -a "$OUT/log.txt"
    "$PY" -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "skipped": "budget"}))' \
      "$name" >> "$OUT/results.jsonl"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[$name] $* (limit ${limit} s)" | tee -a "$OUT/log.txt"
  local begin=$SECONDS line rc
  timeout "$limit" "$@" > "$OUT/stdout.tmp" 2>> "$OUT/log.txt"
  rc=$?
  line=$(tail -n 1 "$OUT/stdout.tmp")
  cat "$OUT/stdout.tmp" >> "$OUT/log.txt"
  rm -f "$OUT/stdout.tmp"
  echo "[$name] exit ${rc} after $((SECONDS - begin)) s" | tee -a "$OUT/log.txt"
  "$PY" -c 'import json, sys
name, rc, command, line = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    row = json.loads(line)
    row = row if isinstance(row, dict) else {"result": row}
except ValueError:  # no JSON: a table (depthwise.py), an error or a timeout (exit 124)
    row = {"last_line": line[-300:]}
print(json.dumps({"name": name, "command": command, "exit": rc, **row}))' \
    "$name" "$rc" "$*" "$line" >> "$OUT/results.jsonl"
}

bench="$PY -m cnnjax.bench"
entry resnet50@224 170 $bench resnet50 --image-size 224 --batch-size 256 --precision bf16 \
  --steps 20 --repeats 5 --json --compare-torch
entry resnet20-epoch 150 $PY -m cnnjax.bench_epoch resnet20 --batch-size 512 --precision bf16 \
  --json --compare-torch
entry depthwise 120 $PY benchmarks/depthwise.py --compare-torch --out "$OUT/depthwise.json"
entry mobilenet_v2@224 150 $bench mobilenet_v2 --image-size 224 --batch-size 256 \
  --precision bf16 --steps 20 --repeats 5 --json --compare-torch
entry efficientnet_b0@224 150 $bench efficientnet_b0 --image-size 224 --batch-size 256 \
  --precision bf16 --steps 20 --repeats 5 --json --compare-torch
entry resnet18-epoch 150 $PY -m cnnjax.bench_epoch resnet18 --batch-size 512 --precision bf16 \
  --json --compare-torch
entry resnet20@32 120 $bench resnet20 --image-size 32 --batch-size 512 --precision bf16 \
  --steps 20 --repeats 5 --json --compare-torch
entry resnet18@32 120 $bench resnet18 --image-size 32 --batch-size 512 --precision bf16 \
  --steps 20 --repeats 5 --json --compare-torch
[ -n "${DRY_RUN:-}" ] || echo "done after $((SECONDS - START)) s: $OUT" | tee -a "$OUT/log.txt"

#!/usr/bin/env bash
# The README's TPU memory table: scripts/plan_memory.py for T5 1.1 small … xxl on four TPU
# topologies, with and without remat (and bf16 frozen weights for xl and xxl), by the TPU
# compiler (pip install -e ".[tpu]"). About 70 minutes on 2 cores; resumable (done plans are
# kept in OUT). Usage: bash scripts/plan_memory_tpu_table.sh [OUT.jsonl]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-tpu_memory_plans.jsonl}
python=${PYTHON:-python}

plan() {  # TOPOLOGY SIZE REMAT FROZEN_DTYPE
  local topology=$1 size=$2 remat=$3 frozen=$4 devices model chip=()
  case $topology in
    v3:2x2) devices=8 ;;
    v3:4x4) devices=32 ;;
    v4:2x2x1) devices=4; chip=(--chip_config_name megacore) ;;
    v4:2x4x4) devices=32; chip=(--chip_config_name megacore) ;;
  esac
  case $size in small|base) model=1 ;; large) model=2 ;; xl) model=4 ;; xxl) model=8 ;; esac
  (( model > devices )) && model=$devices  # model parallelism as t5x runs these sizes
  local key="$topology $size $remat $frozen"
  grep -qF "\"key\": \"$key\"" "$out" 2>/dev/null && return
  local line
  line=$("$python" scripts/plan_memory.py --size "$size" --mesh "$((devices / model))x$model" \
         --topology "$topology" "${chip[@]}" --remat_policy "$remat" --frozen_dtype "$frozen" \
         2>/dev/null | tail -1)
  [[ $line == \{* ]] || { echo "$key: the planner failed" >&2; return; }
  echo "{\"key\": \"$key\", ${line:1}" >> "$out"
  echo "$key: done" >&2
}

for topology in v3:2x2 v4:2x2x1 v3:4x4 v4:2x4x4; do
  for size in small base large xl xxl; do
    for remat in none full; do plan "$topology" "$size" "$remat" float32; done
  done
  for size in xl xxl; do plan "$topology" "$size" full bfloat16; done
done

"$python" - "$out" <<'PY'
import json, sys
plans = {}
for line in open(sys.argv[1]):
  r = json.loads(line)
  plans[tuple(r["key"].split())] = r
usable = {"v3": 15.48, "v4": 30.75}  # GiB per device, as the compiler's refusals state
names = {"v3:2x2": "v3-8: 8 cores", "v4:2x2x1": "v4-8: 4 chips", "v3:4x4": "v3-32: 32 cores",
         "v4:2x4x4": "v4:2x4x4: 32 chips"}
params = {"small": "77M", "base": "248M", "large": "783M", "xl": "2.85B", "xxl": "11.1B"}

def cell(r):
  if r is None:
    return "–"
  if not r["fits"]:
    return f"**no** ({r['per_device_gib']:.1f})" if r["per_device_gib"] else "**no**"
  return f"{r['per_device_gib']:.1f}"

print("| size | slice (topology) | mesh | GiB per device: no remat | full remat | full remat, "
      "bf16 frozen | usable HBM, GiB |")
print("|---|---|---|---|---|---|---|")
for size in params:
  for topology in names:
    row = [plans.get((topology, size, remat, frozen)) for remat, frozen in
           (("none", "float32"), ("full", "float32"), ("full", "bfloat16"))]
    some = next((r for r in row if r), None)
    if some:
      print(f"| {size} ({params[size]}) | {names[topology]} (`{topology}`) | {some['mesh']} | "
            + " | ".join(cell(r) for r in row) + f" | {usable[topology[:2]]} |")
PY

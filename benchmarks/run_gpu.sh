#!/usr/bin/env bash
# One device call: run the GPU benchmarks named as arguments (default: all) in
# sequence, each under its own time limit, logging everything to $OUT/gpu.log.
# Usage on the device machine: bash benchmarks/run_gpu.sh [NAME ...]
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
OUT=${OUT:-out}
mkdir -p "$OUT"
log="$OUT/gpu.log"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(timer_agreement batch_search moe_engine profile_cases moe_decode)
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"
for name in "${names[@]}"; do
  case "$name" in
    pytest) limit=${LIMIT_pytest:-120}; cmd=(python -m pytest -q -rs -m gpu tests --junitxml "$OUT/pytest_gpu.xml" -p no:cacheprovider) ;;
    *) limit_var="LIMIT_$name"; limit=${!limit_var:-240}; cmd=(python "benchmarks/$name.py" --out "$OUT") ;;
  esac
  echo "== $name (limit ${limit}s): ${cmd[*]}" | tee -a "$log"
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "${cmd[@]}" 2>&1 | tee -a "$log"
  echo "== $name exit ${PIPESTATUS[0]} after $(( $(date +%s) - start ))s" | tee -a "$log"
done

#!/usr/bin/env bash
# Issue 11's GPU run (items 2-5) in one call, as it was made on the lent GPU. Run it from a copy holding peftlab/
# and benchmarks/ (and bnb/, bitsandbytes' unpacked wheel, where it is not installed); results go to $OUT.
#   PARTS="memory profile speed scaling"  which parts (default: all, in this order)
#   MEMORY_ARGS, SPEED_ARGS, SCALING_ARGS  extra arguments (e.g. MEMORY_ARGS="--only 3,15" to mend two rows)
set -u
export PYTHONUNBUFFERED=1
[ -d bnb ] && export PYTHONPATH="$PWD/bnb${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-benchmarks/results}
LOG=$OUT/log.txt
PARTS=${PARTS:-memory profile speed scaling}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, transformers, peft, accelerate, bitsandbytes as b; print(sys.version.split()[0], \
torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, accelerate.__version__, b.__version__)"
} >>"$LOG" 2>&1
[ -f "$OUT/memory_accuracy.json" ] || cp benchmarks/results/memory_accuracy.json "$OUT/memory_accuracy.json"
run() { local t=$1; shift; echo "== $* (limit ${t}s) $(date +%T)" >>"$LOG"; timeout "$t" python3 "$@" >>"$LOG" 2>&1; echo "== rc=$? $(date +%T)" >>"$LOG"; }
for part in $PARTS; do
  case $part in
    memory)  run 200 benchmarks/memory_accuracy.py --first-reading --workers 3 --out "$OUT/memory_accuracy.json" ${MEMORY_ARGS:-} ;;
    profile) run 70 benchmarks/smollm2_profile.py --out "$OUT/smollm2_profile.json" ;;
    speed)   run 170 benchmarks/method_speed.py --out "$OUT/method_speed.json" ${SPEED_ARGS:-} ;;
    scaling) run 100 benchmarks/cost_scaling.py --out "$OUT/cost_scaling.json" ${SCALING_ARGS:-} ;;
  esac
done
grep -v -i "warn\|deprecat\|kernels-community\|^ *$\|forward_call" "$LOG" | grep -v "^ *warnings\." | tail -n 120

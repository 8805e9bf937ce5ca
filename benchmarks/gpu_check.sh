#!/usr/bin/env bash
# The GPU check: run once on a GPU machine, from the repository root, in the project's environment.
#
#   bash benchmarks/gpu_check.sh                 # every step; results in runs/gpu_check/
#   bash benchmarks/gpu_check.sh --dry-run       # list the steps and their time limits; needs no GPU (CI runs it)
#   bash benchmarks/gpu_check.sh --out DIR       # write the results to DIR
#
# Steps (each under its own time limit, about 7.5 minutes in all on one H100/H200; a failed or timed-out step is
# recorded and the next one runs):
#   flash_attention   the flash-attention tests (need flash-attn: pip install flash-attn --no-build-isolation)
#   fsdp_trainer      one bf16 Trainer run of a few steps through `accelerate launch` with the FSDP2 config
#                     (examples/accelerate_fsdp.yaml) on every visible GPU
#   parallel_nccl     the TP/EP tests (tests/models/mythos/test_parallel*.py) with the NCCL backend
#   mfu               mythos_1b training-step MFU with sdpa and flash_attention_2 (benchmarks/gpu_mfu.py)
#   decode            mythos_1b greedy decode tokens/s at batch 1 and 64 (benchmarks/gpu_mfu.py)
# It writes DIR/gpu_check.json (every step: command, exit status, seconds, log tail, and the numbers of the last two)
# and DIR/gpu_check.md (the same as a table). Record them in docs/ (docs/plan.md says where).
set -u

OUT=runs/gpu_check
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: error: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (accepted: --dry-run, --out DIR, --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
# the project's venv when there is one (README's setup), else the python on PATH; PYTHON=... overrides
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python}; fi
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
[ "$NGPU" -ge 1 ] 2>/dev/null || NGPU=0
PROCS=$(( NGPU > 0 ? NGPU : 1 ))

LAUNCH="$PY -m accelerate.commands.launch --config_file examples/accelerate_fsdp.yaml --num_processes $PROCS"
TOY_RUN="--toy --precision bf16 --max-steps 4 --save-steps 100000 --logging-steps 1"
# name | time limit (s) | command
STEPS=(
  "flash_attention|60|$PY -m pytest -q -n 0 -rs tests/models/mythos -k flash_attention"
  "fsdp_trainer|150|$LAUNCH examples/pretrain.py $TOY_RUN --output-dir $OUT/fsdp_trainer"
  "parallel_nccl|90|env MYTHOS_TEST_BACKEND=nccl $PY -m pytest -q -n 0 -rs tests/models/mythos -k parallel"
  "mfu|90|$PY benchmarks/gpu_mfu.py train --preset mythos_1b --attn sdpa flash_attention_2 --json $OUT/mfu.json"
  "decode|60|$PY benchmarks/gpu_mfu.py decode --preset mythos_1b --attn sdpa --batch-sizes 1 64 --json $OUT/decode.json"
)

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh --dry-run: $NGPU GPU(s) visible; results would go to $OUT/gpu_check.json and $OUT/gpu_check.md"
  total=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    total=$(( total + limit ))
    printf 'step %-16s limit %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  echo "total time limit: ${total}s"
  exit 0
fi

if [ "$NGPU" = 0 ]; then
  echo "gpu_check.sh: error: no CUDA GPU visible (torch.cuda.device_count() is 0); --dry-run lists the steps" >&2
  exit 2
fi

mkdir -p "$OUT"
RECORDS="$OUT/steps.jsonl"
: > "$RECORDS"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  echo "== $name (limit ${limit}s): $cmd"
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  tail -n 5 "$OUT/$name.log"
  $PY - "$name" "$rc" "$start" "$end" "$cmd" "$OUT/$name.log" >> "$RECORDS" <<'EOF'
import json, sys
name, rc, start, end, cmd, log = sys.argv[1:]
tail = open(log, errors="replace").read()[-2000:]
print(json.dumps({"step": name, "rc": int(rc), "timed_out": int(rc) in (124, 137),
                  "seconds": round(float(end) - float(start), 1), "command": cmd, "log_tail": tail}))
EOF
done

$PY benchmarks/gpu_mfu.py report --out "$OUT" || exit 1
echo "wrote $OUT/gpu_check.json and $OUT/gpu_check.md"

#!/usr/bin/env bash
# The CUDA checks and GPU figures of the engine in one pass, each part time-boxed so one that fails or hangs
# leaves the others' results; logs and JSON go to DEST.
#
#   bash benchmarks/gpu_checks.sh DEST CIFAR10_DIR
#
# Needs the package's dependencies importable, CIFAR-10 in torchvision's layout under CIFAR10_DIR (parts 1 and 2 do
# not read it, so it may still be in the making: part 3 waits up to WAIT_DATA_S seconds for it), and the
# reference packages exported beside the tree (no git history needed):
#   git archive d5c93dd kdd_mlflow | tar -x -C .ref/d5c93dd        # the speed work's reference point
#   git archive cae8dd0^ kdd_mlflow | tar -x -C .ref/prelayers     # the engine before the CPU-written layers
#
# 1. the layer and engine tests on the CUDA device (float64: values, first and second derivatives against torch's
#    functions; image and step-size gradients against d5c93dd), the modules' choice of kernels, and a model logged
#    where CUDA is (its input example checked on the CPU);
# 2. seconds per MTT iteration, this tree against each reference, alternating (benchmarks/compare_ref.py);
# 3. the main job on the GPU under the quick budget (`mlflow run . -e combined`, CIFAR-10, ipc 10);
# 4. the paper budget's stages on CIFAR-10, shortened to fit: one expert, then distillation for a few hundred
#    iterations with the published ipc 10 row, timed per epoch and per iteration.
set -u
DEST=${1:?usage: gpu_checks.sh DEST CIFAR10_DIR}
DATA=$(realpath -m "${2:?usage: gpu_checks.sh DEST CIFAR10_DIR}")
PY=${PYTHON:-python3}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_TRACKING_URI="sqlite:///$DEST/gpu.db"
# `mlflow run` starts the stages as `python -m entrypoints.X`
# (a wrapper, not a link, so a virtual environment's interpreter keeps its environment; in a fresh directory, so
# nothing is written through a link left there)
BIN=$(mktemp -d) && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$PY")" > "$BIN/python"
chmod +x "$BIN/python" && export PATH="$BIN:$PATH"
# each part starts with no stage left over from the one before (a timed-out `mlflow run` can leave its children)
part() { pkill -f "entrypoints[.]" 2>/dev/null && sleep 2; echo; echo "== $1 ($(date +%T))"; }

part device
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit,temperature.gpu --format=csv
  $PY -c "import torch, mlflow, optuna, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device', 'mlflow', mlflow.__version__, 'optuna', optuna.__version__)"; } 2>&1 | tee "$DEST/device.txt"

part "CUDA tests"
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_engine.py \
  tests/test_train_stage.py -k "cuda or gpu_machine or off_the_cpu" -rs \
  2>&1 | tee "$DEST/tests.log" | tail -4

part "engine against references"
for cfg in "convnet 20 unrolled d5c93dd prelayers" "convnet 20 recompute d5c93dd" "convnet-w32 10 unrolled d5c93dd prelayers"
do
  set -- $cfg
  for ref in "${@:4}"; do
    timeout "${COMPARE_S:-45}" $PY benchmarks/compare_ref.py --ref-dir ".ref/$ref" --rounds 2 \
      --json-out "$DEST/compare_${ref}_$1_s$2_$3.json" -- --device cuda --dataset cifar10 --ipc 10 \
      --model "$1" --syn-steps "$2" --matching "$3" --iterations 10 2>&1 | tail -1
  done
done

for _ in $(seq "${WAIT_DATA_S:-150}"); do [ -e "$DATA/cifar-10-batches-py/batches.meta" ] && break; sleep 1; done
part "main job, quick budget, CIFAR-10 ipc 10"
start=$(date +%s)
timeout "${COMBINED_S:-170}" $PY -m mlflow run . -e combined --env-manager local -P dataset=cifar10 -P "data_dir=$DATA" \
  -P budget=quick -P ipc=10 -P env_manager=local > "$DEST/combined.log" 2>&1
echo "rc $? in $(( $(date +%s) - start )) s"; grep -v "^\s*$" "$DEST/combined.log" | tail -25

part "paper budget, CIFAR-10, one expert and a shortened distillation"
start=$(date +%s)
timeout "${EXPERTS_S:-100}" $PY -m entrypoints.experts --dataset cifar10 --data-dir "$DATA" --budget paper \
  --num-experts 1 --epochs "${PAPER_EPOCHS:-25}" > "$DEST/paper_experts.log" 2>&1
echo "experts rc $? in $(( $(date +%s) - start )) s"; tail -3 "$DEST/paper_experts.log"
run=$(sed -n 's/^run_id: //p' "$DEST/paper_experts.log" | tail -1)
if [ -n "$run" ]; then
  start=$(date +%s)
  timeout "${DISTILL_S:-150}" $PY -m entrypoints.distill --experts-run "$run" --dataset cifar10 --data-dir "$DATA" \
    --budget paper --ipc 10 --iterations "${PAPER_ITERATIONS:-200}" --eval-every "${PAPER_ITERATIONS:-200}" \
    > "$DEST/paper_distill.log" 2>&1
  echo "distill rc $? in $(( $(date +%s) - start )) s"; tail -5 "$DEST/paper_distill.log"
fi
part done

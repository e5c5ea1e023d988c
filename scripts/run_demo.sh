#!/usr/bin/env bash
# The demo job behind `make demo` (README command 1), run after the set-up: write the demo data, train
# configs/demo.yaml, validate the best checkpoint with validate.py, print val top-1 and where everything is.
#
# Environment: PYTHON (default .venv/bin/python), DEMO_DATA (default data/demo), DEMO_OUTPUT (default output/demo).
# Extra arguments go to train.py, e.g. `scripts/run_demo.sh --epochs 2`. Each run gets its own timestamped folder,
# so nothing from an earlier run is overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DEMO_DATA:-data/demo}
OUTPUT=${DEMO_OUTPUT:-output/demo}
# demo data size: keep in step with configs/demo.yaml (img_size) and the BENCHMARKS.md demo row
TRAIN_PER_CLASS=300
VAL_PER_CLASS=50
IMAGE_SIZE=64

if [[ ! -x "$PYTHON" ]]; then
    echo "run_demo.sh: error: no Python at $PYTHON; run \`make demo\` (it creates .venv) or set PYTHON" >&2
    exit 1
fi

"$PYTHON" scripts/make_demo_data.py --output "$DATA" --num-classes 10 --train-per-class "$TRAIN_PER_CLASS" \
    --val-per-class "$VAL_PER_CLASS" --image-size "$IMAGE_SIZE"

experiment="demo-$(date +%Y%m%d-%H%M%S)"
run_dir="$OUTPUT/$experiment"
mkdir -p "$OUTPUT"
log="$OUTPUT/$experiment.log"
start=$SECONDS
"$PYTHON" train.py --config configs/demo.yaml --data-dir "$DATA" --output "$OUTPUT" --experiment "$experiment" \
    --log-tb "$@" 2>&1 | tee "$log"
train_seconds=$((SECONDS - start))
mv "$log" "$run_dir/train.log"

checkpoint="$run_dir/model_best.pth.tar"
# validate.py takes the model, its kwargs and the eval transforms from the args the checkpoint saved, so both measure
# the same thing
"$PYTHON" validate.py "$DATA" --checkpoint "$checkpoint" --workers 1 \
    --results-file "$run_dir/validate.json" 2>&1 | tee "$run_dir/validate.log"

top1=$("$PYTHON" -c 'import json, sys; print(format(json.load(open(sys.argv[1]))[0]["top1"], ".2f"))' \
    "$run_dir/validate.json")
cat <<EOF

Demo finished: training took ${train_seconds}s.
  val top-1 (validate.py):  ${top1}%
  checkpoint:               $checkpoint (last: $run_dir/last.pth.tar)
  logs:                     $run_dir/train.log, $run_dir/summary.csv, $run_dir/validate.json,
                            TensorBoard: tensorboard --logdir $run_dir
  plots:                    $run_dir/curves.png
  resolved options:         $run_dir/args.yaml
EOF

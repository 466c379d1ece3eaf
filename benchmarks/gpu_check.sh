#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: PatchCore's search and coreset against the CPU's,
# the benchmark (train, evaluate, latency, GPU memory) of both models on GPU, the quick start and
# a resumed training on GPU, an export of a GPU-trained model, an STFPM run at 512x512 that
# the CPU is too slow for, normal images added to a PatchCore bank, and one pipeline shared by threads.
#
#   bash benchmarks/gpu_check.sh DATA_ROOT OUT   # DATA_ROOT holds hazelnut_toy/ and glassfiber/
#
# PY (default python3) and DEVICE (default gpu) choose the interpreter and device; with DEVICE=cpu
# and ITERS=20 the script checks itself on a CPU machine in a few minutes (4 on 2 busy cores).
set -uo pipefail
DATA=${1:?DATA_ROOT}; OUT=${2:?OUT}; PY=${PY:-python3}; DEVICE=${DEVICE:-gpu}; ITERS=${ITERS:-2000}
RUNS=${RUNS:-/tmp/flawscope_gpu_check}
export PYTHONUNBUFFERED=1
rm -rf "$RUNS"; mkdir -p "$RUNS" "$OUT"
step() { echo; echo "=== $* ($(date +%T))"; }
fs() { "$PY" -m flawscope "$@"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__,
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'threads', torch.get_num_threads())"

step "PatchCore's exact search and greedy coreset on $DEVICE against the CPU's (oneDNN where it runs)"
"$PY" - "$DEVICE" <<'PY'
import sys, time, torch
from flawscope.device import parse_device
from flawscope.models.knn import OneDnnIndex, nearest_neighbors, onednn_available
from flawscope.training.patchcore_fit import greedy_coreset
dev = parse_device(sys.argv[1])[0]
gen = torch.Generator().manual_seed(0)
bank, queries = torch.randn(6000, 152, generator=gen), torch.randn(40000, 152, generator=gen)
d_cpu, i_cpu = OneDnnIndex(bank).search(queries) if onednn_available() else nearest_neighbors(queries, bank)
d_dev, i_dev = nearest_neighbors(queries.to(dev), bank.to(dev))
print(f"search on {dev}: same nearest entry for {(i_dev.cpu() == i_cpu).float().mean():.5f} of the queries, "
      f"distances within {(d_dev.cpu() - d_cpu).abs().max():.1e}")
points = torch.randn(200000, 64, generator=gen)
for where in ("cpu", dev):
    start = time.perf_counter()
    chosen, radius = greedy_coreset(points.to(where), 2000)
    print(f"coreset of 2,000 on {where}: {time.perf_counter() - start:.2f} s, radius {radius:.5f}, "
          f"checksum {int(chosen.sum())}")
PY

step "benchmark: STFPM and PatchCore, shipped configs, Global.device=$DEVICE"
fs benchmark --datasets "$DATA/hazelnut_toy" "$DATA/glassfiber" --models STFPM PatchCore \
   -o Global.device="$DEVICE" -o Train.epochs_iters="$ITERS" --output "$RUNS/bench"
cp "$RUNS/bench/benchmark.md" "$RUNS/bench/benchmark.json" "$OUT/" 2>/dev/null

step "quick start on $DEVICE with the bundled model"
fs --pipeline anomaly_detection --input src/flawscope/assets/demo --save_path "$RUNS/quick" --device "$DEVICE"

step "train 40 iterations, then resume from iteration 20, on $DEVICE"
common=(-c configs/STFPM.yaml -o Global.device="$DEVICE" -o Global.dataset_dir="$DATA/hazelnut_toy"
        -o Train.epochs_iters=40 -o Train.save_interval=20 -o Train.eval_interval=20)
fs "${common[@]}" -o Global.mode=train -o Global.output="$RUNS/resume_a" | tail -n 2
fs "${common[@]}" -o Global.mode=train -o Global.output="$RUNS/resume_b" \
   -o Train.resume_path="$RUNS/resume_a/iter_20" | tail -n 2

step "export the GPU-trained glassfiber STFPM model to ONNX and evaluate the export on the CPU"
fs -c configs/STFPM.yaml -o Global.mode=export -o Global.device="$DEVICE" \
   -o Global.output="$RUNS/bench/glassfiber/STFPM" && ls -l "$RUNS/bench/glassfiber/STFPM/export"
fs -c configs/STFPM.yaml -o Global.mode=evaluate -o Global.device=cpu -o Global.dataset_dir="$DATA/glassfiber" \
   -o Evaluate.weight_path="$RUNS/bench/glassfiber/STFPM/export" -o Global.output="$RUNS/onnx_eval" | tail -n 3

step "STFPM on glassfiber at 512x512 (evaluated every 250 iterations), on $DEVICE"
start=$(date +%s)
fs -c configs/STFPM.yaml -o Global.mode=train -o Global.device="$DEVICE" -o Global.dataset_dir="$DATA/glassfiber" \
   -o Model.input_size=512 -o Train.epochs_iters="$ITERS" -o Train.eval_interval=250 \
   -o Global.output="$RUNS/stfpm512" | tail -n 1
echo "wall $(( $(date +%s) - start )) s"
cp "$RUNS/stfpm512/train_result.json" "$OUT/stfpm512_train_result.json" 2>/dev/null

step "PatchCore trained on $DEVICE on half of hazelnut_toy's good images, then the other half added to its bank"
for half in a b; do mkdir -p "$RUNS/half_$half/train/good"; cp -r "$DATA/hazelnut_toy/test" "$DATA/hazelnut_toy/ground_truth" "$RUNS/half_$half/"; done
half=a; for f in "$DATA"/hazelnut_toy/train/good/*; do cp "$f" "$RUNS/half_$half/train/good/"; half=$([ $half = a ] && echo b || echo a); done
pc=(-c configs/PatchCore.yaml -o Global.mode=train -o Global.device="$DEVICE")
fs "${pc[@]}" -o Global.dataset_dir="$RUNS/half_a" -o Global.output="$RUNS/pc_a" | tail -n 1
fs "${pc[@]}" -o Global.dataset_dir="$RUNS/half_b" -o Global.output="$RUNS/pc_b" \
   -o Train.add_normals="$RUNS/pc_a/best_model/inference" | tail -n 1

step "one pipeline on $DEVICE shared by 4 threads: the scores of one-by-one runs"
"$PY" - "$DEVICE" "$DATA/hazelnut_toy/test" <<'PY'
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from flawscope import create_pipeline
files = sorted(str(f) for f in Path(sys.argv[2]).rglob("*") if f.is_file())
pipeline = create_pipeline("anomaly_detection", device=sys.argv[1])
alone = [r.raw_score for r in pipeline.predict(files)]
with ThreadPoolExecutor(4) as pool:
    shared = list(pool.map(lambda f: next(iter(pipeline.predict(f))).raw_score, files * 3))
gap = max(abs(a - b) for a, b in zip(alone * 3, shared))
print(f"{len(shared)} predictions from 4 threads: largest score difference to one-by-one runs {gap:.1e}")
PY

step done
cat "$OUT/benchmark.md" 2>/dev/null

#!/usr/bin/env bash
# One visit to a lent GPU (the `device` tool): the `gpu` profile's rows of one model, side by side,
# left unscored (the labelled images stay here); what comes back is scored with run_all.py --score.
#
# Here:   ../shared/tools/gpu-prep.sh && python benchmarks/run_all.py --models MODEL --pack .gpu/shared
# Device: run with carry [".gpu", "models/<model>.onnx" where the model is an export] and the command
#         source .gpu/env.sh && bash benchmarks/gpu_visit.sh MODEL DEADLINE_SECONDS
# Here:   cat FILES_AT/visit.tgz.* | tar xz -C DIR && for d in DIR/*/; do
#             python benchmarks/run_all.py --models "" --score "$d"; done
#
# The rows run as separate processes (the GPU is far from saturated by one): real-image rows from the
# start, the DSG rows once the first of them has made and cached the synthetic set (one seed). Whatever has not
# finished by DEADLINE_SECONDS is stopped; every finished run's results.json and models are packed
# into $OUT/visit.tgz.* (15 MB pieces: the device returns 8 files of at most 16 MiB).
set -u
model=${1:?model name (run_all.py MANIFEST)}
deadline=${2:-540}
out=${OUT:?run on the device, where OUT is set}
work=/tmp/gpu-visit
mkdir -p "$work"
export DSGONNX_SHARED=${SHARED:?source .gpu/env.sh first}
start=$(date +%s)
# onnx2torch imports torchvision for two converters no classifier here uses; the GPU image may lack it
python3 -c "import torchvision" 2> /dev/null || { mkdir -p /tmp/site/torchvision
  printf 'def _missing(*args, **kwargs):\n    raise NotImplementedError("torchvision is not installed")\n\n\nroi_align = nms = box_convert = _missing\n' \
    > /tmp/site/torchvision/ops.py; echo "from . import ops" > /tmp/site/torchvision/__init__.py
  echo "torchvision missing: stubbed" >> "$out/visit.log"; }
python3 -c "import dsgonnx.graph.to_torch, torch; print('torch', torch.__version__, torch.cuda.is_available())" \
  >> "$out/visit.log" 2>&1 || { echo "dsgonnx does not import" >> "$out/visit.log"; exit 1; }
left() { echo $(( deadline - ($(date +%s) - start) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
(while sleep 20; do echo "$(( $(date +%s) - start )) s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used \
  --format=csv,noheader 2>&1)"; done) > "$out/gpu-use.log" 2>&1 &
watcher=$!
pids=()
row() {  # row NAME BITS SOURCES
  local name=$1 bits=$2 sources=$3
  [ "$(left)" -gt 1 ] || return 0
  (timeout "$(left)" python3 benchmarks/run_all.py --profile gpu --device cuda --models "$model" --bits "$bits" \
     --sources "$sources" --calib-cache "$work/cache" --defer-scoring --out "$work/$name" > "$out/$name.log" 2>&1
   echo "rc=$? after $(( $(date +%s) - start )) s" >> "$out/$name.log") &
  pids+=($!)
}
row synth 6,4 dsg-batch
row real4 4 real+refine+cands
row real6 6 real+refine
until ls "$work"/cache/*.npz > /dev/null 2>&1 || grep -q "^rc=" "$out/synth.log" 2>/dev/null \
  || [ "$(left)" -le 1 ]; do sleep 2; done  # (the set is written atomically)
echo "synthetic set ready after $(( $(date +%s) - start )) s" >> "$out/visit.log"
row dsg4 4 dsg-batch+refine+cands
row dsg6 6 dsg-batch+refine+cands
row lsq4 4 dsg-batch+refine+lsq+cands
row views4 4 dsg-batch+refine+views4+cands
row qat4 4 dsg-batch+qat
[ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
kill "$watcher" 2>/dev/null
echo "all rows done or stopped after $(( $(date +%s) - start )) s" >> "$out/visit.log"
cd "$work" && tar cz --exclude cache -- */results.json */models 2>> "$out/visit.log" | split -b 15M - "$out/visit.tgz."
ls -la "$out" >> "$out/visit.log"

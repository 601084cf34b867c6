#!/usr/bin/env bash
# One visit to a lent GPU (the `device` tool): rows of the `gpu` profile for one model, a few side by
# side, left unscored (the labelled images stay here); what comes back is scored with run_all.py --score.
#
# Here:   ../shared/tools/gpu-prep.sh && python benchmarks/run_all.py --models MODEL --pack .gpu/shared
# Device: run with carry [".gpu", "models/<model>.onnx" where the model is an export] and the command
#         source .gpu/env.sh && bash benchmarks/gpu_visit.sh MODEL DEADLINE_SECONDS JOBS BITS:ROW ...
#         e.g. ... efficientnet_lite0 540 3 4:dsg-batch+refine+cands 6:dsg-batch+refine+cands 4:real+refine+cands
# Here:   mkdir DIR && cat FILES_AT/visit.tgz.* | tar xz -C DIR && for d in DIR/*/; do
#             python benchmarks/run_all.py --models "" --score "$d"; done
#
# Each BITS:ROW is one run_all.py process (its own --out), at most JOBS at once; the first synthetic
# row makes and caches the synthetic set, the others start once it is there. What has not finished by
# DEADLINE_SECONDS is stopped; the logs and every finished run's results.json and models are packed into
# $OUT/visit.tgz.* (15 MB pieces: the device returns 8 files of at most 16 MiB, so nothing else goes
# to $OUT). Measured on an H200 (16 CPU cores): eight rows at once starved each other on the CPU (ONNX
# Runtime's calibration and the fallback's probes) and none of the Lite0 W4A4 reconstructions at 2000
# iterations per block finished in 535 s; alone, one at 500 iterations took 93 s.
set -u
model=${1:?model name (run_all.py MANIFEST)}
deadline=${2:?seconds}
jobs=${3:?rows run at once}
shift 3
out=${OUT:?run on the device, where OUT is set}
work=/tmp/gpu-visit
mkdir -p "$work/logs"
export DSGONNX_SHARED=${SHARED:?source .gpu/env.sh first}
start=$(date +%s)
left() { echo $(( deadline - ($(date +%s) - start) )); }
log=$work/logs/visit.log
# onnx2torch imports torchvision for two converters no classifier here uses; the GPU image may lack it
python3 -c "import torchvision" 2> /dev/null || { mkdir -p /tmp/site/torchvision
  printf 'def _missing(*args, **kwargs):\n    raise NotImplementedError("torchvision is not installed")\n\n\nroi_align = nms = box_convert = _missing\n' \
    > /tmp/site/torchvision/ops.py; echo "from . import ops" > /tmp/site/torchvision/__init__.py
  echo "torchvision missing: stubbed" >> "$log"; }
python3 -c "import dsgonnx.graph.to_torch, torch; print('torch', torch.__version__, torch.cuda.is_available())" \
  >> "$log" 2>&1 || { echo "dsgonnx does not import" >> "$log"; cp "$log" "$out/"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
(while sleep 20; do echo "$(( $(date +%s) - start )) s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used \
  --format=csv,noheader 2>&1)"; done) > "$work/logs/gpu-use.log" 2>&1 &
watcher=$!
pids=()
running() { local n=0 pid; for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && n=$((n + 1)); done; echo $n; }
made=0
for spec in "$@"; do
  bits=${spec%%:*} sources=${spec#*:} name=w${spec%%:*}-${spec#*:}
  if [[ $sources != real* ]]; then
    if [ $made = 1 ]; then  # the set is written atomically: once it is there, it is whole
      until ls "$work"/cache/*.npz > /dev/null 2>&1 || [ "$(running)" = 0 ] || [ "$(left)" -le 1 ]; do sleep 2; done
    fi
    made=1
  fi
  while [ "$(running)" -ge "$jobs" ] && [ "$(left)" -gt 1 ]; do sleep 2; done
  [ "$(left)" -gt 1 ] || break
  echo "$(( $(date +%s) - start )) s: start $name" >> "$log"
  (timeout "$(left)" python3 benchmarks/run_all.py --profile gpu --device cuda --models "$model" --bits "$bits" \
     --sources "$sources" --calib-cache "$work/cache" --defer-scoring --out "$work/$name" > "$work/logs/$name.log" 2>&1
   echo "rc=$? after $(( $(date +%s) - start )) s" >> "$work/logs/$name.log") &
  pids+=($!)
done
[ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
kill "$watcher" 2> /dev/null
echo "all rows done or stopped after $(( $(date +%s) - start )) s" >> "$log"
cd "$work" && tar cz --exclude cache -- logs $(ls -d */results.json */models 2> /dev/null) | split -b 15M - "$out/visit.tgz."
tail -n 3 logs/*.log

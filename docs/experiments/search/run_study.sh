#!/bin/bash
# The reports' head search measured (issue 28 item 5; docs/experiments.md, "Hyperparameter
# search"). Run from the repository root under the shared CPU lock:
#   flock /work/cpu.lock bash docs/experiments/search/run_study.sh OUT_DIR
# OUT_DIR gets every JSON answer and the time stamps; OUT_DIR/home is the CXR_HOME it uses.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: run_study.sh OUT_DIR}")
DATA=${CXR_SHARED_DATA:-../shared/data}
HERE=docs/experiments/search
export CXR_HOME=$OUT/home CXR_WORKER=off CXR_DEMO=off TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$CXR_HOME"
PY=.venv/bin/python
stamp() { date +%s > "$OUT/$1"; }
run() { local name=$1; shift; "$PY" -m cxr_core "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err"; }
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$OUT/$1.json" "$2"; }

run index index "$DATA/chest_xray_224/train" --name kermany224
run index_ext index "$DATA/chest_xray_224_external" --name external224 --external
stamp t_default0
run default_run train --config "$HERE/seed004_head_default.json"
stamp t_study0
run create search create --config "$HERE/seed004_head.json" --no-worker
run worker worker --once
stamp t_study1
run status search status seed004-head
run best search best seed004-head
run promote search promote seed004-head --set '{"image_size": 64, "epochs": 8, "patience": 3}' --no-worker
stamp t_promote0
run worker_promote worker --once
stamp t_promote1
for who in best:$(json best run_id) default:$(json default_run run_id) promoted:$(json promote run_id); do
  run "eval_${who%%:*}_ext" evaluate --model "${who#*:}" --data "$DATA/chest_xray_224_external"
done
stamp t_end

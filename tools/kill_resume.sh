#!/usr/bin/env bash
# Kills `wgqat train` with SIGKILL at random moments, resumes it each time (--resume once the run
# folder exists), and checks that the finished run equals an uninterrupted one: every tensor of
# last.safetensors bit for bit, and metrics.jsonl line for line (img/s aside). Needs a release
# build and python3 with safetensors and torch.
#   bash tools/kill_resume.sh [KILLS] [WORK_DIR]
set -euo pipefail
kills_wanted=${1:-10}
work=${2:-$(mktemp -d)}
W=$(realpath target/release/wgqat)
model=$(realpath examples/models/tiny_nin.json)
mkdir -p "$work" && cd "$work" && rm -rf ref killed
"$W" data synthetic --out data --train 600 --test 100 >/dev/null 2>&1
args=(--model "$model" --data data --epochs 4 --batch-size 25 --eval-batch-size 100
      --save-minutes 0.03 --log-every 4)
"$W" train "${args[@]}" --out ref >ref.log 2>&1
start() {
    if [ -f killed/config.json ]; then "$W" train --resume killed >>killed.log 2>&1 &
    else "$W" train "${args[@]}" --out killed >>killed.log 2>&1 &
    fi
    pid=$!
}
kills=0
start
while [ "$kills" -lt "$kills_wanted" ]; do
    s=$(python3 -c "import random; print(round(random.uniform(1.5, 6.0), 2))")
    sleep "$s"
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the run finished before kill $((kills + 1)): use more epochs"; break
    fi
    kill -9 "$pid"; wait "$pid" 2>/dev/null || true
    kills=$((kills + 1))
    echo "kill $kills after ${s}s; metrics up to $(tail -1 killed/metrics.jsonl 2>/dev/null | grep -o '"step":[0-9]*' || echo 'nothing yet')"
    start
done
wait "$pid"
python3 - <<'PY'
import json
from safetensors.torch import load_file
a, b = load_file("ref/last.safetensors"), load_file("killed/last.safetensors")
same = a.keys() == b.keys() and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "img_per_s"} for l in open(p)]
ma, mb = strip("ref/metrics.jsonl"), strip("killed/metrics.jsonl")
print(f"{len(a)} tensors {'bit-identical' if same else 'DIFFER'}; metrics {len(ma)} vs {len(mb)} lines, {'same' if ma == mb else 'DIFFER'}")
raise SystemExit(0 if same and ma == mb else 1)
PY

#!/usr/bin/env bash
# Measures wgqat and PyTorch (eager and torch.compile) on the same GPU, back to back, and prints
# the comparison table. Run from the repository root with a release build and PyTorch installed:
#   cargo build --release && bash tools/bench_side_by_side.sh [OUT_DIR] [extra wgqat bench flags]
set -euo pipefail
out=${1:-bench-results}; shift || true
mkdir -p "$out"
./target/release/wgqat info | tee "$out/wgqat_info.txt"
./target/release/wgqat bench --json "$@" > "$out/wgqat.json"
python3 tools/torch_bench.py --json > "$out/torch_eager.json"
python3 tools/torch_bench.py --compile --json > "$out/torch_compile.json"
python3 tools/bench_table.py "$out/wgqat.json" "$out/torch_eager.json" "$out/torch_compile.json" | tee "$out/table.md"
# Integer vs fake-quant inference (batches 1 and 256), and the per-kernel table.
./target/release/wgqat bench --infer | tee "$out/wgqat_infer.txt"
./target/release/wgqat bench kernels --batch 256 | tee "$out/wgqat_kernels.txt"

#!/usr/bin/env bash
# Everything to check and measure on a GPU machine, in one command of about 19 minutes at most
# (the batch-256 targets within the first 10): the kernels checked on the real GPU (`wgqat
# selftest`), then wgqat against PyTorch (eager and torch.compile) on the same GPU, most important
# numbers first. Each part has its own time limit and writes its output to OUT_DIR, so a part that
# fails or runs long costs only itself.
#
#   bash tools/gpu_check.sh [OUT_DIR]       (default: $OUT, else gpu-results)
#
# Expects target/release/wgqat (built anywhere with glibc no newer than the GPU machine's) and,
# where the NVIDIA driver comes without the Vulkan loader, the .deb files of libvulkan1 (and its
# GL/EGL companions) in .gl/: they are unpacked into / and VK_DRIVER_FILES points at the driver.
set -uo pipefail
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
if compgen -G ".gl/*.deb" >/dev/null; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ]; then export VK_DRIVER_FILES=$nvidia_icd; fi
W=./target/release/wgqat

# part NAME SECONDS COMMAND...: stdout to OUT/NAME.txt, stderr to OUT/NAME.err.
part() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.err"
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')"
}

part info 60 "$W" info
part selftest 120 "$W" selftest --json
# The targets first: batch 256, W8A8, both models, against torch.compile and eager.
part wgqat_256 120 "$W" bench --json --bits 8 --batch 256 --no-breakdown
part torch_compile_256 200 python3 tools/torch_bench.py --compile --json --bits 8 --batch 256
part torch_eager_256 60 python3 tools/torch_bench.py --json --bits 8 --batch 256
python3 tools/bench_table.py "$out/wgqat_256.txt" "$out/torch_eager_256.txt" \
    "$out/torch_compile_256.txt" >"$out/table_256.md" 2>>"$out/table.err"
# Then the full grid (fp32 too, batches 50 and 128) with the per-kernel breakdown.
part wgqat_all 120 "$W" bench --json
part torch_eager_all 90 python3 tools/torch_bench.py --json
part torch_compile_all 240 python3 tools/torch_bench.py --compile --json
python3 tools/bench_table.py "$out/wgqat_all.txt" "$out/torch_eager_all.txt" \
    "$out/torch_compile_all.txt" >"$out/table_all.md" 2>>"$out/table.err"
part kernels_256 60 "$W" bench kernels --batch 256
part infer 60 "$W" bench --infer
cat "$out/table_256.md" "$out/table_all.md" 2>/dev/null

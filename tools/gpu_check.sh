#!/usr/bin/env bash
# Everything to check and measure on a GPU machine, in one command of at most 6 minutes: the
# kernels checked on the real GPU (`wgqat selftest`), then wgqat against PyTorch (eager and
# torch.compile) on the same GPU, NIN-GC and NIN at batch 256 and ResNet-18 at batch 128, most
# important numbers first. Each part has its own time limit and writes its output to OUT_DIR, so a part that
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

# Time limits add up to 6 minutes (the lent machine comes in short windows): the batch-256
# targets first (DoReFa, and IAO W8A8 beside it in wgqat and eager PyTorch; wgqat uses the
# adapter's cooperative matrices for quantized convs' forward, grad-weight and grad-input where it has them,
# runs once more without them, and once with each of those GEMMs on the kernel its tuning timed
# faster), then ResNet-18 at batch 128 (torch.compile left out for
# time), then the per-kernel table (with the cooperative-matrix rows and the `+bn` rows, the GEMMs doing
# BatchNorm's work in their loads, as a training step runs a 1x1 conv's; beside the plain rows they
# show what the BatchNorm backward in a 3x3 conv's loads would cost; 3 timed runs each). The
# first row of wgqat_256 (nin_gc, DoReFa) carries the cold first step (`first_step_s`: network,
# pipelines compiled and the step run), the 2-second target.
# The GPU as its driver reports it (model, driver, clocks, power limit: what a peak FLOP/s
# figure depends on), then the adapter as wgpu sees it and the seconds opening it took (with
# tensor cores, their kernels checked on a throwaway device first): the wait before a first step
# that `first_step_s` does not count.
part info 15 sh -c 'nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1; exec "$0" info' "$W"
# The table, not --json: it prints case by case, so a selftest stopped by its limit (each case
# compiles its own pipelines) still shows every case it ran. Cases run 8 at a time (`--jobs`'s
# default on 16 cores), their pipelines compiling side by side.
part selftest 45 "$W" selftest
# Each benchmark prints its table as it goes (NAME.txt) and rewrites NAME.json after every row,
# so a part stopped by its time limit keeps the rows it finished. wgqat_256 also times one step
# kernel by kernel (JSON `kernels`: ms, and for the memory-bound ones bytes and GB/s; `gemms`:
# each GEMM launch), one more step per row.
part wgqat_256 55 "$W" bench --out "$out/wgqat_256.json" --model nin_gc,nin --scheme dorefa,iao --bn-fuse --bits 8 --batch 256
part wgqat_256_fp32 25 env WGQAT_COOP=0 "$W" bench --out "$out/wgqat_256_fp32.json" --model nin_gc,nin --bits 8 --batch 256 --no-breakdown
# Each quantized conv GEMM on the kernel that timed faster in this very step (`--tune-kernels`:
# 3 steps of each family first; wgqat_256_tuned.txt prints the per-layer timings and choice).
part wgqat_256_tuned 20 "$W" bench --out "$out/wgqat_256_tuned.json" --model nin_gc,nin --bits 8 --batch 256 --warmup 3 --steps 20 --no-breakdown --tune-kernels
part torch_compile_256 90 python3 tools/torch_bench.py --compile --out "$out/torch_compile_256.json" --model nin_gc,nin --bits 8 --batch 256
part torch_eager_256 40 python3 tools/torch_bench.py --out "$out/torch_eager_256.json" --model nin_gc,nin --scheme dorefa,iao,iao-bn --bits 8 --batch 256
python3 tools/bench_table.py "$out/wgqat_256.json" "$out/torch_eager_256.json" \
    "$out/torch_compile_256.json" >"$out/table_256.md" 2>>"$out/table.err"
python3 tools/bench_table.py "$out/wgqat_256_fp32.json" "$out/torch_eager_256.json" \
    "$out/torch_compile_256.json" >"$out/table_256_fp32_path.md" 2>>"$out/table.err"
python3 tools/bench_table.py "$out/wgqat_256_tuned.json" "$out/torch_eager_256.json" \
    "$out/torch_compile_256.json" >"$out/table_256_tuned.md" 2>>"$out/table.err"
part wgqat_resnet18 25 "$W" bench --out "$out/wgqat_resnet18.json" --model resnet18 --bits 8 --batch 128 --no-breakdown
part torch_eager_resnet18 20 python3 tools/torch_bench.py --out "$out/torch_eager_resnet18.json" --model resnet18 --bits 8 --batch 128
python3 tools/bench_table.py "$out/wgqat_resnet18.json" "$out/torch_eager_resnet18.json" \
    >"$out/table_resnet18.md" 2>>"$out/table.err"
part kernels_256 25 "$W" bench kernels --out "$out/kernels_256.json" --model nin_gc,nin --batch 256 --repeat 3
cat "$out/table_256.md" "$out/table_256_fp32_path.md" "$out/table_256_tuned.md" "$out/table_resnet18.md" 2>/dev/null

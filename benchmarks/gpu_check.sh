#!/usr/bin/env bash
# The GPU figures of issue 5, in one short device run (the `device` tool lends a GPU to some tasks).
#
#   1. here, once per session, from the repository root (needs ../shared/data and PyPI):
#        bash benchmarks/gpu_check.sh prepare
#      copies the held-out subject into .gpu-data/ and the nibabel wheel (absent on the GPU
#      image) into .whl/, both ignored by git (about 12 MB together);
#   2. on the device: run(command="bash benchmarks/gpu_check.sh run", carry=[".gpu-data", ".whl"],
#      timeout_s=540). It prints the GPU, runs the CUDA tests, then the benchmark of our engine on
#      CUDA (3 volumes per pairing, +-5 deg / +-5 mm; volume mode and slices mode) and leaves
#      benchmark.md / benchmark.json / gpu.log under $OUT/gpu (the device tool copies them back).
#
# DEVICE=cpu bash benchmarks/gpu_check.sh run   runs the same steps on the CPU (a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    src="${RRR_DATA:-../shared/data}/brats/BraTS2021_90004"
    [ -d "$src" ] || { echo "error: held-out subject not found: $src" >&2; exit 2; }
    rm -rf .gpu-data && mkdir -p .gpu-data .whl
    cp -r "$src" .gpu-data/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl "nibabel==$(python3 -c 'import nibabel; print(nibabel.__version__)')"
    du -sh .gpu-data .whl
    ;;
run)
    device="${DEVICE:-cuda}"
    out="${OUT:-/tmp/rrr-gpu-check}/gpu"
    mkdir -p "$out"
    site=/tmp/rrr-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD/RigidResNetRegistration:$PWD/training:$PWD/benchmarks" PYTHONUNBUFFERED=1
    {
        nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
        python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
        if [ "$device" = cuda ]; then
            python3 -m pytest -q -p no:cacheprovider Testing/test_engine.py Testing/test_refine.py Testing/test_refine_slices.py -k cuda
        fi
        python3 -m rrr_benchmarks.run --data .gpu-data --device "$device" --volumes 3 --pairs 30 --motions normal \
            --methods ours --no-cli -o "$out"
    } 2>&1 | tee "$out/gpu.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac

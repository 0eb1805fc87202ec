#!/usr/bin/env bash
# The GPU kernels check, as one device call (a session lent a GPU runs it once; ~2 minutes on an H100):
# the Triton kernels in a CUDA-graph-captured decode step at 0/50/90% FFN sparsity against cuBLAS's dense
# GEMVs (also graph-captured), Llama-2-7B and TinyLlama FFN shapes, bf16, batch 1 and 4, with each side's share
# of the measured read bandwidth. Needs torch + triton only (the device image has torch 2.11, Triton 3.6).
#   OUT=bench/results bash bench/gpu_kernels.sh
set -euo pipefail
OUT=${OUT:-bench/results}
pip install -q --no-deps --no-build-isolation -e . >/dev/null
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
for batch in 1 4; do
  python -m lte bench kernel --device cuda --dtype bfloat16 --shape 4096x11008,2048x5632 \
    --sparsity 0,0.5,0.9 --batch "$batch" --repeats 20 --json "$OUT/kernel_cuda_${device}_bfloat16_batch${batch}.json"
done

#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one pass: build _engine_cuda for this GPU's architecture
# (a development build, modules next to the sources), the CUDA tests, generate() on the GPU, the
# quick start on the GPU, and the GPU benchmarks (generation against transformers, fine-tuning
# tokens/s and memory). Each step has its own time limit so one failure still leaves the others'
# results. Logs and JSON go to $OUT (default bench/results/gpu).
#
#     bash bench/gpu_check.sh                      # all steps
#     bash bench/gpu_check.sh build tests generate # some of: build tests cli generate finetune profile sampler
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
STEPS=${*:-build tests cli generate finetune}
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT/python
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, report the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
}

NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)'
  $NVCC --version | tail -2; git log -1 --format='commit %h %s' 2>/dev/null; } | tee "$OUT/env.txt"
ARCH=$($PY -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')

if want build; then
  step build 180 bash -c "cmake -S . -B build/gpu -G Ninja -DCMAKE_CUDA_COMPILER=$NVCC -DGPT2S_CUDA=ON -DGPT2S_CUDA_ARCHITECTURES=$ARCH \
    -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) -DPython_EXECUTABLE=\$(command -v $PY) && cmake --build build/gpu -j 16"
  tail -1 "$OUT/build.log"
fi
if want tests; then
  step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_generate_engine.py tests/test_generate_batch.py tests/test_model.py
  tail -3 "$OUT/tests.log"
fi
if want cli; then  # the README's quick start (fine-tune tiny, generate) with the GPU
  step cli 120 bash -c "rm -rf /tmp/gpt2s-cli && mkdir /tmp/gpt2s-cli && cd /tmp/gpt2s-cli && \
    $PY -m gpt_2_simple finetune --model_name tiny --steps 200 --batch_size 8 --accumulate_gradients 1 --learning_rate 0.001 && \
    $PY -m gpt_2_simple generate --nsamples 3 --length 200 --seed 1 && head -c 600 gen/*"
  grep -E '^\[200|backend|cuda|tok/s' "$OUT/cli.log" | tail -4
fi
if want generate; then
  step bench_generate 120 $PY bench/generate_cuda.py --reps 3 --batch 1 64 256 --out "$OUT/generate_cuda.json"
  grep -E '^(batch|sampling|weights)' "$OUT/bench_generate.log"
fi
if want profile; then  # GPU time per kernel of decode steps (Nsight Compute), for the next optimisation
  step profile 150 $PY bench/profile_cuda.py --batch 1 64
  cat "$OUT/profile.log"
fi
if want sampler; then  # the sampler's time phase by phase (bench/sampler_phases.cu; needs no build step)
  CUBLAS_INCLUDE=$(dirname "$( (ls /usr/local/cuda*/include/cublas_v2.h
    $PY -c 'import glob, nvidia; [print(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/include/cublas_v2.h")]') 2>/dev/null | head -1)")
  mkdir -p build
  step sampler 120 bash -c "$NVCC -std=c++17 -O3 -arch=sm_$ARCH -DGPT2S_SAMPLER_TRACE -Icsrc/cuda -I$CUBLAS_INCLUDE \
    bench/sampler_phases.cu -o build/sampler_phases && build/sampler_phases"
  cat "$OUT/sampler.log"
fi
if want finetune; then
  step bench_finetune 180 $PY bench/finetune_gpu.py --reps 1 --steps 20 --warmup-steps 8 --out "$OUT/finetune_gpu.json"
  grep -E '(124M|355M):' "$OUT/bench_finetune.log"
fi

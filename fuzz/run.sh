#!/usr/bin/env bash
# Fuzz the readers of files from strangers (fuzz/README.md). Usage:
#   fuzz/run.sh SECONDS_PER_TARGET [RUNS_PER_TARGET]
# Builds the C++ loader harness with clang (libFuzzer + ASan + UBSan), runs it and the three
# atheris targets one after another, each for at most SECONDS (or RUNS executions), and exits
# non-zero on the first finding (the crashing input is left in build/fuzz/).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
runs=${2:--1}
work=build/fuzz
mkdir -p "$work"
clangxx=$(command -v clang++ || ls /usr/bin/clang++-* 2>/dev/null | sort -V | tail -1)
[ -n "$clangxx" ] || { echo "fuzz: clang++ is needed (apt-get install clang)"; exit 1; }
"$clangxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Icsrc \
    fuzz/bin_loader.cpp csrc/engine/format.cpp -o "$work/bin_loader"
PYTHONPATH="$PWD/python:${PYTHONPATH:-}" python fuzz/seeds.py "$work/seeds"
for target in bin_loader tf_index safetensors prompts; do
  mkdir -p "$work/corpus/$target"
  flags=(-max_total_time="$seconds" -runs="$runs" -max_len=16384 -rss_limit_mb=2048 -timeout=10
         -artifact_prefix="$work/$target-" -print_final_stats=1)
  echo "== fuzz $target (${seconds} s at most)"
  if [ "$target" = bin_loader ]; then
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
      "$work/bin_loader" "${flags[@]}" "$work/corpus/$target" "$work/seeds/$target" 2>"$work/$target.log" \
      || { tail -60 "$work/$target.log"; echo "fuzz: FINDING in $target"; exit 1; }
  else
    PYTHONPATH="$PWD/python:${PYTHONPATH:-}" python fuzz/fuzz_readers.py "$target" "${flags[@]}" \
      "$work/corpus/$target" "$work/seeds/$target" 2>"$work/$target.log" \
      || { tail -60 "$work/$target.log"; echo "fuzz: FINDING in $target"; exit 1; }
  fi
  grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$work/$target.log" | tail -1
done
echo "fuzz: no findings"

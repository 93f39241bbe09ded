"""The engine issue's generation benchmark: our engine (fp32 and bf16), our PyTorch KV-cached loop
and transformers' generate on the 124M geometry (random weights), prompt 16 tokens, 128 new tokens,
top-k 40, batch 1 and 20; tokens/s, ratios to transformers, weight GB/s beside a measured
bandwidth, sampling share, peak RSS (docs/bench.md, docs/engine.md "Speed"). The same as

    python bench/run.py --suites generation --batches 1,20 --prompts 16 --reps 5

and any option of bench/run.py after it overrides these (e.g. --reps 3, --batches 20).
"""

from run import main

if __name__ == "__main__":
    main(("--suites", "generation", "--batches", "1,20", "--prompts", "16", "--reps", "5"), program="bench/generate.py", doc=__doc__)

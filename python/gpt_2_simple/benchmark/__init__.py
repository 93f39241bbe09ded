"""Benchmarks of gpt_2_simple against its peers (``gpt_2_simple bench``, ``python bench/run.py``).

One module per suite (generation, batching, load, tokenizer, finetune, gpu), each with a
``measure(options) -> list[record]``; ``common`` holds what they share (machine context,
interleaved timing, peers in worker processes, peak RSS); ``report`` turns a results file into
markdown, a PNG chart and the README's Performance section; ``harness`` runs the suites.
Nothing here is imported by ``import gpt_2_simple``. See docs/bench.md.
"""

"""Run the benchmark suites from a checkout: results to bench/results/ (JSON, markdown, PNG).

    python bench/run.py                                   # every suite, full sizes (about 1.5 hours on 2 cores)
    python bench/run.py --quick --model tiny              # smoke run, a minute or two
    python bench/run.py --suites generation,batching --reps 7
    python bench/run.py --readme bench/results/X.json [reruns] [GPU results files] [--apply README.md]

The same as ``gpt_2_simple bench`` (which writes to ./bench_results); see docs/bench.md.
"""

import argparse
import sys

from checkout import ROOT  # the checkout's sources or the installed package

from gpt_2_simple.benchmark import harness


def main(defaults: tuple[str, ...] = (), program: str = "bench/run.py", doc: str = __doc__) -> None:
    """Parses ``defaults`` then the command line (later options override earlier ones) and runs."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_arguments(parser, output_dir=str(ROOT / "bench" / "results"))
    args = parser.parse_args([*defaults, *sys.argv[1:]])
    try:
        harness.main(args, program=f"python {program}")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

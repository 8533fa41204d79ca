"""The `fusedtrain` command: check, bench, demo."""
import os
import sys

USAGE = """usage: fusedtrain {check,bench,demo} [options]

  check   self-test of every available backend on this device against the reference
  bench   kernel microbenchmarks against PyTorch (table, results.json, PNG)
  demo    an AMP training run using FusedBCEWithLogits, FusedAdamW and GradScaler

`fusedtrain COMMAND --help` for the options of each."""


def _bench(argv):
    # The suites live in the repository's benchmarks/ folder, beside the package.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "benchmarks")
    if not os.path.exists(os.path.join(bench_dir, "run.py")):
        print("fusedtrain bench: benchmarks/ not found beside the package; run it from a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    sys.path.insert(0, bench_dir)
    import run as bench_run

    return bench_run.main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        from fusedtrain import selfcheck

        return selfcheck.main(rest)
    if cmd == "bench":
        return _bench(rest)
    if cmd == "demo":
        from fusedtrain import demo

        return demo.main(rest)
    print(f"fusedtrain: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2

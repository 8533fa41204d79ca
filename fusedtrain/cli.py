"""The `fusedtrain` command: check, bench, demo, build, and --version."""
import sys

USAGE = """usage: fusedtrain {check,bench,demo,build} [options]
       fusedtrain --version

  check   self-test of every available backend on this device against the reference
  bench   kernel microbenchmarks against PyTorch (table, results.json, PNG)
  demo    an AMP training run using FusedBCEWithLogits, FusedAdamW and GradScaler
  build   compile the native extension for the torch you run (when the installed one is
          missing or was built for another torch), into ~/.cache/fusedtrain

`fusedtrain COMMAND --help` for the options of each."""


def main(argv=None) -> int:
    """Runs one command and returns its exit status (2 for a usage error).

    Args:
        argv: the command and its options (sys.argv[1:] when None).
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-V", "--version"):
        from fusedtrain._version import __version__

        print(f"fusedtrain {__version__}")
        return 0
    if cmd == "check":
        from fusedtrain import selfcheck

        return selfcheck.main(rest)
    if cmd == "bench":
        from fusedtrain.benchmarks import run

        return run.main(rest)
    if cmd == "demo":
        from fusedtrain import demo

        return demo.main(rest)
    if cmd == "build":
        from fusedtrain import _jit_build

        return _jit_build.main(rest)
    print(f"fusedtrain: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

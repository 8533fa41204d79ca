"""Benchmark suites of `fusedtrain bench` (run.py), shipped with the package so that an
installed fusedtrain can measure itself: bce, adam and amp against their PyTorch baselines,
and soak, a long training run against the torch composition.

    fusedtrain bench [--only bce,adam,amp] [--quick]     # or: python -m fusedtrain.benchmarks.run
    python -m fusedtrain.benchmarks.<suite> [--quick]    # one suite alone
"""

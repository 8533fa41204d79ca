"""Soak run (not a test): ~5000 optimizer steps of the demo model with every fused piece
against the torch composition (BCEWithLogitsLoss, torch.amp.GradScaler, AdamW(fused=True)),
same seeds and data; reports how far loss and parameters drift apart over the run.

    python -m fusedtrain.benchmarks.soak [--steps 5000] [--device cpu]
"""
import argparse
import json
import os

import torch

from .. import demo


def main(argv=None):
    """Runs both trainings, prints the drift table and writes soak.json.

    Args:
        argv: the command-line arguments (sys.argv[1:] when None); --help lists them.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    cfg = demo.Config(device=a.device)
    per_epoch = cfg.samples // cfg.batch
    cfg.epochs = max(1, round(a.steps / per_epoch))
    data = demo.make_data(cfg)
    ours, l_ours, t_ours = demo.train("fusedtrain", cfg, data)
    ref, l_ref, t_ref = demo.train("torch", cfg, data)
    n = len(l_ours)
    drift = [abs(a_ - b_) / max(abs(b_), 1e-12) for a_, b_ in zip(l_ours, l_ref)]
    windows = [(i, min(n, i + n // 5)) for i in range(0, n, max(1, n // 5))]
    print(f"soak: {n} steps on {a.device}; fusedtrain {t_ours * 1e3:.2f} ms/step, torch {t_ref * 1e3:.2f} ms/step")
    print("steps          mean loss (ours)  mean loss (torch)  max rel. loss drift")
    for lo, hi in windows:
        mo = sum(l_ours[lo:hi]) / (hi - lo)
        mr = sum(l_ref[lo:hi]) / (hi - lo)
        print(f"{lo:5d}-{hi - 1:<7d} {mo:17.5f}  {mr:17.5f}  {max(drift[lo:hi]):19.3e}")
    pdiff = demo.max_param_diff(ours, ref)
    pscale = max(p_.abs().max().item() for p_ in ref.parameters())
    print(f"final loss: ours {l_ours[-1]:.5f}, torch {l_ref[-1]:.5f}; "
          f"largest parameter difference {pdiff:.3e} (largest |param| {pscale:.3f})")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "soak.json"), "w") as f:
        json.dump({"steps": n, "loss_ours": l_ours, "loss_torch": l_ref, "max_param_diff": pdiff,
                   "ms_per_step": {"fusedtrain": t_ours * 1e3, "torch": t_ref * 1e3}}, f)


if __name__ == "__main__":
    main()

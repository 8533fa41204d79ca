"""`fusedtrain demo`: a real AMP training run that uses all three fused pieces.

A multi-label classifier (an MLP, 64 classes with strongly imbalanced label frequencies,
data generated locally from a seed) trained with autocast (bf16 on CPU, fp16 on CUDA),
GradScaler, FusedBCEWithLogits with pos_weight from the training label frequencies,
FusedAdamW under a cosine schedule, and gradient accumulation. `--compare` runs the same
seeded loop with torch's BCEWithLogitsLoss, torch.amp.GradScaler and
torch.optim.AdamW(fused=True) and reports both loss curves, the largest parameter
difference and the time per step of each.

`--labels N` trains a many-label tagger instead: the same MLP body ending in
FusedLinearBCEWithLogits(hidden, N) with sparse positive targets (a few labels per sample out
of N, never a dense B x N target or logits); `--compare` runs it against nn.Linear +
BCEWithLogitsLoss on dense targets and reports both losses, times and peak memory of a step.
"""
import argparse
import dataclasses
import json
import os
import time

import torch
from torch import nn

from fusedtrain import _plot

NUM_CLASSES = 64
FEATURES = 128


@dataclasses.dataclass
class Config:
    """The demo run's settings.

    Args:
        samples: training samples (a quarter as many more are held out).
        epochs: passes over the training samples.
        batch: samples per optimizer step.
        accum: micro-batches per optimizer step (gradient accumulation).
        hidden: width of the MLP's hidden layers.
        lr, weight_decay: AdamW's.
        max_norm: gradient clipping norm.
        seed: seeds the data, the model and the batch order.
        device: where the model trains.
    """

    samples: int = 49152
    epochs: int = 8
    batch: int = 256
    accum: int = 2
    hidden: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-2
    max_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"


def make_data(cfg: Config):
    """((x, y) training, (x, y) held out): features and 64 labels whose frequencies fall from
    ~40% to ~0.5% (a power law), generated from a fixed random linear teacher so the task is
    learnable.

    Args:
        cfg: samples and seed are used.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.samples + cfg.samples // 4
    x = torch.randn(n, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, NUM_CLASSES, generator=g) / FEATURES ** 0.5
    score = x @ teacher + 0.3 * torch.randn(n, NUM_CLASSES, generator=g)
    freq = 0.4 * (torch.arange(1, NUM_CLASSES + 1, dtype=torch.float32) ** -1.2)
    freq = freq.clamp(min=0.005)
    threshold = torch.quantile(score, 1 - freq, dim=0).diagonal()
    y = (score > threshold).float()
    split = cfg.samples
    return (x[:split], y[:split]), (x[split:], y[split:])


def make_model(cfg: Config) -> nn.Module:
    """The seeded MLP on cfg.device.

    Args:
        cfg: hidden, seed and device are used.
    """
    torch.manual_seed(cfg.seed)
    return nn.Sequential(
        nn.Linear(FEATURES, cfg.hidden), nn.GELU(),
        nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
        nn.Linear(cfg.hidden, NUM_CLASSES),
    ).to(cfg.device)


def make_pieces(kind: str, model: nn.Module, pos_weight: torch.Tensor, cfg: Config):
    """(criterion, optimizer, scaler) from fusedtrain or from torch.

    Args:
        kind: "fusedtrain" or "torch".
        model: whose parameters the optimizer steps.
        pos_weight: the criterion's pos_weight, per class.
        cfg: lr, weight_decay and device are used.
    """
    if kind == "fusedtrain":
        import fusedtrain

        crit = fusedtrain.FusedBCEWithLogits(pos_weight=pos_weight)
        opt = fusedtrain.FusedAdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = fusedtrain.GradScaler(cfg.device)
    else:
        crit = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        scaler = torch.amp.GradScaler(cfg.device)
    return crit, opt, scaler


def train(kind: str, cfg: Config, data, progress=True):
    """One seeded training run; returns (model, losses per optimizer step, seconds per step).

    Args:
        kind: "fusedtrain" (the one-read clipped step) or "torch" (unscale_, clip, step).
        cfg: the run's settings.
        data: make_data(cfg)'s value.
        progress: show a tqdm bar per epoch where tqdm is installed.
    """
    (x, y), _ = data
    x, y = x.to(cfg.device), y.to(cfg.device)
    pos = y.mean(0).clamp(min=1e-3)
    pos_weight = ((1 - pos) / pos).to(cfg.device)  # negatives per positive, per class
    model = make_model(cfg)
    crit, opt, scaler = make_pieces(kind, model, pos_weight, cfg)
    micro = cfg.batch // cfg.accum
    steps_per_epoch = cfg.samples // cfg.batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    amp_dtype = torch.float16 if torch.device(cfg.device).type == "cuda" else torch.bfloat16
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses, step_times = [], []
    bar_mod = None
    if progress:
        try:
            from tqdm import tqdm as bar_mod
        except ImportError:
            bar_mod = None
    for epoch in range(cfg.epochs):
        order = torch.randperm(cfg.samples, generator=g).to(cfg.device)
        steps = range(steps_per_epoch)
        if bar_mod is not None:
            steps = bar_mod(steps, desc=f"{kind} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for s in steps:
            t0 = time.perf_counter()
            step_loss = torch.zeros((), device=cfg.device)
            for a in range(cfg.accum):
                idx = order[s * cfg.batch + a * micro: s * cfg.batch + (a + 1) * micro]
                with torch.autocast(torch.device(cfg.device).type, dtype=amp_dtype):
                    loss = crit(model(x[idx]), y[idx]) / cfg.accum
                scaler.scale(loss).backward()
                step_loss += loss.detach()
            if kind == "fusedtrain":  # the one-read step: check, norm, clip and AdamW, no host sync
                scaler.step(opt, max_norm=cfg.max_norm)
            else:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_norm)
                scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            losses.append(float(step_loss))
    return model, losses, sum(step_times[5:]) / max(1, len(step_times) - 5)


@torch.no_grad()
def per_class_report(model: nn.Module, data, cfg: Config) -> str:
    """Precision, recall and F1 per class on the held-out data, as text.

    Args:
        model: the trained model.
        data: make_data(cfg)'s value.
        cfg: device is used.
    """
    _, (x, y) = data
    pred = (model(x.to(cfg.device)).float() > 0).cpu()
    y = y.bool()
    try:
        from sklearn.metrics import classification_report

        return classification_report(y.numpy(), pred.numpy(), zero_division=0,
                                     target_names=[f"class {c:2d}" for c in range(NUM_CLASSES)])
    except ImportError:
        pass
    tp = (pred & y).sum(0).double()
    prec = tp / pred.sum(0).clamp(min=1)
    rec = tp / y.sum(0).clamp(min=1)
    f1 = 2 * prec * rec / (prec + rec).clamp(min=1e-12)
    lines = [f"{'':10s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'support':>7s}"]
    for c in range(NUM_CLASSES):
        lines.append(f"class {c:2d}   {prec[c]:9.3f} {rec[c]:7.3f} {f1[c]:6.3f} {int(y[:, c].sum()):7d}")
    lines.append(f"macro avg  {prec.mean():9.3f} {rec.mean():7.3f} {f1.mean():6.3f} {int(y.sum()):7d}")
    return "\n".join(lines)


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest absolute difference between corresponding parameters.

    Args:
        a, b: two models of one architecture.
    """
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _plot_curves(curves: dict, path: str):
    plt = _plot.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, ys), style in zip(curves.items(), ("-", "--")):
        ax.plot(ys, style, label=name, linewidth=1, alpha=0.8)  # dashed: visible where they coincide
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (BCE with pos_weight)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("fusedtrain demo: loss curves")
    return _plot.save(fig, path, dpi=120)


# ---- the many-label demo (--labels N) -------------------------------------------------------

LABELS_PER_SAMPLE = 4


def make_label_data(cfg: Config, num_labels: int):
    """(x, positives) with positives an (n, LABELS_PER_SAMPLE) tensor of label indices: every
    sample draws its labels from a power law over num_labels and its features are the mean of
    their random prototypes plus noise (learnable, as tagging data is)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.samples + cfg.samples // 4
    proto = torch.randn(num_labels, FEATURES, generator=g)
    freq = torch.arange(1, num_labels + 1, dtype=torch.float64) ** -0.8
    pos = torch.multinomial(freq, n * LABELS_PER_SAMPLE, replacement=True, generator=g).view(n, LABELS_PER_SAMPLE)
    x = proto[pos].mean(1) * 2 + 0.5 * torch.randn(n, FEATURES, generator=g)
    return x, pos


def _batch_target(pos, kind, num_labels):
    k = pos.shape[1]
    if kind == "fusedtrain":  # sparse positives: (row offsets, label indices)
        return torch.arange(0, pos.numel() + 1, k, device=pos.device), pos.flatten()
    y = torch.zeros(pos.shape[0], num_labels, device=pos.device)
    return y.scatter_(1, pos, 1.0)


def train_labels(kind: str, cfg: Config, num_labels: int, data, steps: int):
    """`steps` AMP steps of the many-label tagger; returns (losses, ms per step, precision@1 on
    held-out samples)."""
    import fusedtrain

    x, pos = (t.to(cfg.device) for t in data)
    torch.manual_seed(cfg.seed)
    body = nn.Sequential(nn.Linear(FEATURES, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
    if kind == "fusedtrain":
        head = fusedtrain.FusedLinearBCEWithLogits(cfg.hidden, num_labels, reduction="sum")
        opt_cls, scaler = fusedtrain.FusedAdamW, fusedtrain.GradScaler(cfg.device)
    else:
        head = nn.Linear(cfg.hidden, num_labels)
        opt_cls, scaler = torch.optim.AdamW, torch.amp.GradScaler(cfg.device)
    body, head = body.to(cfg.device), head.to(cfg.device)
    params = list(body.parameters()) + list(head.parameters())
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype = torch.float16 if torch.device(cfg.device).type == "cuda" else torch.bfloat16
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses, times = [], []
    for s in range(steps):
        idx = torch.randint(0, cfg.samples, (cfg.batch,), generator=g).to(cfg.device)
        target = _batch_target(pos[idx], kind, num_labels)
        t0 = time.perf_counter()
        with torch.autocast(torch.device(cfg.device).type, dtype=amp_dtype):
            feats = body(x[idx])
            if kind == "fusedtrain":
                loss = head(feats, target) / cfg.batch
            else:
                loss = nn.functional.binary_cross_entropy_with_logits(head(feats), target, reduction="sum") / cfg.batch
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    with torch.no_grad():
        held_x, held_pos = x[cfg.samples:], pos[cfg.samples:]
        lin = head if kind != "fusedtrain" else head.logits
        top = lin(body(held_x[:1024])).argmax(1)
        p_at_1 = (held_pos[:1024] == top[:, None]).any(1).float().mean().item()
    return losses, 1e3 * sum(times[3:]) / max(1, len(times) - 3), p_at_1


def labels_main(a, cfg: Config) -> int:
    """`fusedtrain demo --labels N`: trains the tagger, prints and writes demo_labels.json."""
    if a.quick:
        cfg.samples, cfg.hidden = 4096, 256
    steps = 20 if a.quick else 200
    data = make_label_data(cfg, a.labels)
    print(f"fusedtrain demo --labels {a.labels}: {cfg.samples} samples, {LABELS_PER_SAMPLE} positives each, "
          f"batch {cfg.batch}, {steps} AMP steps, device {cfg.device}; head: FusedLinearBCEWithLogits "
          f"({cfg.hidden} -> {a.labels}) on sparse positives")
    losses, ms, p1 = train_labels("fusedtrain", cfg, a.labels, data, steps)
    print(f"fusedtrain: loss {losses[0]:.3f} -> {losses[-1]:.3f} (per sample), {ms:.1f} ms/step, "
          f"held-out precision@1 {p1:.3f}")
    result = {"labels": a.labels, "fusedtrain": {"losses": losses, "ms_per_step": ms, "precision_at_1": p1}}
    if a.compare:
        t_losses, t_ms, t_p1 = train_labels("torch", cfg, a.labels, data, steps)
        print(f"torch (nn.Linear + BCEWithLogitsLoss, dense targets): loss {t_losses[0]:.3f} -> {t_losses[-1]:.3f}, "
              f"{t_ms:.1f} ms/step, precision@1 {t_p1:.3f} ({t_ms / ms:.2f}x the head's time)")
        result["torch"] = {"losses": t_losses, "ms_per_step": t_ms, "precision_at_1": t_p1}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "demo_labels.json"), "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    """`fusedtrain demo`: trains, prints the report (and the comparison), writes demo.json and
    the loss-curve PNG; returns the exit status.

    Args:
        argv: the command-line arguments (sys.argv[1:] when None); --help lists them.
    """
    p = argparse.ArgumentParser(prog="fusedtrain demo", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--accum", type=int, default=Config.accum, help="micro-batches per optimizer step")
    p.add_argument("--compare", action="store_true", help="also run the torch composition and compare")
    p.add_argument("--quick", action="store_true", help="a short run (for tests)")
    p.add_argument("--out", default="demo-results", help="directory for the PNG and JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--labels", type=int, default=0,
                   help="train a many-label tagger with N labels on the fused linear+BCE head instead")
    a = p.parse_args(argv)
    cfg = Config(device=a.device, epochs=a.epochs, accum=a.accum)
    if a.labels:
        if a.labels < 2:
            p.error("--labels must be at least 2")
        return labels_main(a, cfg)
    if a.quick:
        cfg.samples, cfg.epochs, cfg.hidden = 4096, 2, 256
    if cfg.batch % cfg.accum:
        p.error(f"--accum must divide the batch size {cfg.batch}")
    torch.manual_seed(cfg.seed)
    data = make_data(cfg)
    print(f"fusedtrain demo: {cfg.samples} samples, {NUM_CLASSES} classes "
          f"(label frequency {data[0][1].mean(0).max():.1%} .. {data[0][1].mean(0).min():.2%}), "
          f"{cfg.epochs} epochs, batch {cfg.batch} in {cfg.accum} micro-batches, device {cfg.device}")
    model, losses, t_ours = train("fusedtrain", cfg, data, progress=not a.no_progress)
    print(f"fusedtrain: final loss {losses[-1]:.4f}, {t_ours * 1e3:.2f} ms/step")
    print(per_class_report(model, data, cfg))
    os.makedirs(a.out, exist_ok=True)
    result = {"fusedtrain": {"losses": losses, "ms_per_step": t_ours * 1e3}}
    if a.compare:
        ref, ref_losses, t_ref = train("torch", cfg, data, progress=not a.no_progress)
        diff = max_param_diff(model, ref)
        print("\nstep   fusedtrain loss   torch loss")
        stride = max(1, len(losses) // 12)
        for i in list(range(0, len(losses), stride)) + [len(losses) - 1]:
            print(f"{i:4d}   {losses[i]:15.5f}   {ref_losses[i]:10.5f}")
        print(f"largest parameter difference: {diff:.3e}")
        print(f"time per step: fusedtrain {t_ours * 1e3:.2f} ms, torch {t_ref * 1e3:.2f} ms "
              f"({t_ref / t_ours:.2f}x)")
        result["torch"] = {"losses": ref_losses, "ms_per_step": t_ref * 1e3}
        result["max_param_diff"] = diff
        png = _plot_curves({"fusedtrain": losses, "torch": ref_losses}, os.path.join(a.out, "demo_loss.png"))
        if png:
            print(f"loss curves: {png}")
    with open(os.path.join(a.out, "demo.json"), "w") as f:
        json.dump(result, f)
    return 0

"""Training quality of the lean optimizer states: the same seeded runs with fp32 AdamW moments,
bf16 moments (state_format="bf16"), 8-bit moments (state_format="8bit"), bf16 params rounded
to nearest and stochastically
(stochastic_rounding=True), and bf16 params with fp32 master weights, on two models:

- "demo": the multi-label MLP of `fusedtrain demo` (BCE with pos_weight, its data);
- "char-lm": a small character-level transformer language model on a fixed text that ships
  with Python (the source of the argparse module: no download).

Each run has the same data order and initial weights; the reported loss is the mean training
loss of the last 10% of steps. Targets (#14): within 1% of fp32 AdamW for bf16 moments, within
2% for 8-bit moments and for stochastic rounding. Writes quality.json and quality.png (the loss curves).

    python -m fusedtrain.benchmarks.adam_quality [--quick] [--out DIR]
"""
import argparse
import json
import math
import os

import torch
from torch import nn

import fusedtrain
from fusedtrain import _plot

# name -> (param dtype, FusedAdamW options)
FORMATS = {
    "fp32 AdamW": (torch.float32, {}),
    "bf16 moments": (torch.float32, {"state_format": "bf16"}),
    "8-bit moments": (torch.float32, {"state_format": "8bit"}),
    "bf16 params, nearest": (torch.bfloat16, {}),
    "bf16 params, stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True, "sr_seed": 0}),
    "bf16 params, fp32 master weights": (torch.bfloat16, {"master_weights": True}),
}
TARGETS = {"bf16 moments": 0.01, "8-bit moments": 0.02, "bf16 params, stochastic rounding": 0.02}


class CharLM(nn.Module):
    """A 2-layer pre-norm transformer over bytes."""

    def __init__(self, vocab=256, d=128, heads=4, layers=2, context=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        h = self.embed(x) + self.pos[:n]
        return self.out(self.blocks(h, mask=self.mask[:n, :n], is_causal=True))


def _text_bytes():
    import argparse as source

    with open(source.__file__, "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def _lm_run(fmt, steps, seed=0, batch=32, context=64, lr=2e-3):
    dtype, opts = FORMATS[fmt]
    data = _text_bytes()
    torch.manual_seed(seed)
    model = CharLM(context=context).to(dtype)
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=lr, weight_decay=0.01, **opts)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, data.numel() - context - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + context] for i in idx.tolist()])
        y = torch.stack([data[i + 1:i + context + 1] for i in idx.tolist()])
        loss = nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _demo_run(fmt, steps, seed=0):
    from fusedtrain import demo

    dtype, opts = FORMATS[fmt]
    cfg = demo.Config(samples=8192, hidden=256, seed=seed)
    (x, y), _ = demo.make_data(cfg)
    pos = y.mean(0).clamp(min=1e-3)
    crit = fusedtrain.FusedBCEWithLogits(pos_weight=(1 - pos) / pos)
    model = demo.make_model(cfg).to(dtype)
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **opts)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, cfg.samples, (cfg.batch,), generator=g)
        loss = crit(model(x[idx].to(dtype)).float(), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


MODELS = {"demo": _demo_run, "char-lm": _lm_run}


def final_loss(losses):
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def _plot_curves(curves, path):
    plt = _plot.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4))
    for ax, (model, runs) in zip(axes, curves.items()):
        for fmt, losses in runs.items():
            k = max(1, len(losses) // 50)  # a running mean, for legibility
            smooth = [sum(losses[i:i + k]) / k for i in range(0, len(losses) - k + 1, k)]
            ax.plot([i * k for i in range(len(smooth))], smooth, label=fmt, linewidth=1)
        ax.set_title(model)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return _plot.save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps (a smoke run, not a measurement)")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    steps = {"demo": 30, "char-lm": 15} if a.quick else {"demo": 800, "char-lm": 500}
    curves, table = {}, []
    for model, run in MODELS.items():
        curves[model] = {fmt: run(fmt, steps[model]) for fmt in FORMATS}
        base = final_loss(curves[model]["fp32 AdamW"])
        for fmt, losses in curves[model].items():
            loss = final_loss(losses)
            rel = loss / base - 1
            target = TARGETS.get(fmt)
            ok = "" if target is None else ("met" if abs(rel) <= target else "NOT met")
            table.append({"model": model, "format": fmt, "steps": steps[model], "final_loss": loss,
                          "vs_fp32": rel, "target": target, "status": ok, "finite": math.isfinite(loss)})
    print(f"{'model':8s}  {'format':34s}  {'final loss':>10s}  {'vs fp32':>8s}  target")
    for r in table:
        tgt = "" if r["target"] is None else f"within {r['target']:.0%}: {r['status']}"
        print(f"{r['model']:8s}  {r['format']:34s}  {r['final_loss']:10.4f}  {r['vs_fp32']:+8.2%}  {tgt}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "quality.json"), "w") as f:
        json.dump({"rows": table, "curves": curves}, f)
    png = _plot_curves(curves, os.path.join(a.out, "quality.png"))
    print(f"wrote {os.path.join(a.out, 'quality.json')}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

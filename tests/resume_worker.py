"""A seeded AMP training run that can stop at a step, save everything, and resume in a new
process (tests/test_reliability.py runs it as a subprocess)."""
import sys

import torch
from torch import nn

import fusedtrain

TOTAL = 40


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 24, generator=g), (torch.rand(32, 10, generator=g) > 0.8).float()


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 10))
    crit = fusedtrain.FusedBCEWithLogits(pos_weight=torch.linspace(1, 4, 10))
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.05, amsgrad=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5)
    return model, crit, opt, sched, scaler


def train(model, crit, opt, sched, scaler, start, stop):
    for step in range(start, stop):
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = crit(model(x), y)
        scaler.scale(loss).backward()
        if step % 11 == 3:  # an overflow now and then: the step is skipped, the scale backs off
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()


def main(mode, path):
    torch.set_num_threads(1)
    model, crit, opt, sched, scaler = build()
    if mode == "full":
        train(model, crit, opt, sched, scaler, 0, TOTAL)
    elif mode == "first-half":
        train(model, crit, opt, sched, scaler, 0, TOTAL // 2)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "scaler": scaler.state_dict()}, path + ".ckpt")
        return
    elif mode == "second-half":
        ck = torch.load(path + ".ckpt")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        scaler.load_state_dict(ck["scaler"])
        train(model, crit, opt, sched, scaler, TOTAL // 2, TOTAL)
    torch.save({"params": [p.detach() for p in model.parameters()], "scale": scaler.get_scale(),
                "state": opt.state_dict()["state"]}, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

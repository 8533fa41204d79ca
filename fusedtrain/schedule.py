"""SkipAwareLambdaLR: a learning-rate schedule that does not advance on a step GradScaler
skipped, decided on the device (no host sync).

torch's schedulers count their steps on the host, so skipping a scheduler step on an inf/NaN
step needs the skip flag on the host: `if not bool(scaler.last_step_skipped(opt)):
sched.step()` -- free on CPU, one sync per step on a GPU. Here the count of steps taken lives
on the device instead, and every step() writes lr = base_lr * lr_lambda(count) into the param
group's lr tensor, which fusedtrain's optimizers (and torch's fused or capturable ones) read on
the device. docs/design.md §7.
"""
import torch

__all__ = ["SkipAwareLambdaLR"]


class SkipAwareLambdaLR:
    """torch.optim.lr_scheduler.LambdaLR counting only the optimizer steps that were taken.

    lr = base_lr * lr_lambda(steps_taken), where steps_taken (a 0-d int64 tensor on the
    params' device) is the number of step() calls of this scheduler that followed a
    scaler.step(optimizer) which applied the update: step() after a skipped step leaves the
    count, and the lr, as they were. Call it where LambdaLR's step() goes, once per
    scaler.step(optimizer) (before or after scaler.update()).

    Args:
        optimizer: its param groups' "lr" become 0-d fp32 tensors on the params' device
            (a float lr is replaced by one; a tensor lr is written in place). The optimizer
            must read a tensor lr on the device to stay without a sync: fusedtrain's
            FusedAdam/FusedAdamW, torch's Adam/AdamW with fused=True or capturable=True.
        lr_lambda: a function of the count, or a list of them (one per param group), as
            LambdaLR's; it gets the count as a tensor and must use tensor ops
            (``torch.clamp(step / 100, max=1.0)``, ``0.95 ** step``, ``torch.cos(...)``,
            ``table[step.clamp(max=len(table) - 1)]`` for a precomputed schedule), since
            ``min()``, ``if`` or ``math.cos`` would read it on the host.
        scaler: the fusedtrain.GradScaler that steps the optimizer (its
            last_step_skipped(optimizer) is the skip flag; a disabled scaler skips nothing).
    """

    def __init__(self, optimizer, lr_lambda, scaler):
        self.optimizer, self.scaler = optimizer, scaler
        groups = optimizer.param_groups
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != len(groups):
                raise ValueError(f"Expected {len(groups)} lr_lambdas, but got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * len(groups)
        device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
        for group in groups:
            lr = group["lr"]
            # torch's schedulers keep the lr they started from under "initial_lr"
            group.setdefault("initial_lr", float(lr))
            if not torch.is_tensor(lr):
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        self.base_lrs = [float(g["initial_lr"]) for g in groups]
        self._steps_taken = torch.zeros((), dtype=torch.int64, device=device)
        self._write_lrs()

    def step(self):
        """Advance the schedule by one step unless the optimizer's last scaler.step() was
        skipped; no host sync."""
        skipped = self.scaler.last_step_skipped(self.optimizer)
        self._steps_taken.add_(skipped.logical_not().to(self._steps_taken.device, non_blocking=True))
        self._write_lrs()

    def _write_lrs(self):
        for group, base_lr, lr_lambda in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            lr = base_lr * lr_lambda(self._steps_taken)
            if torch.is_tensor(lr):
                group["lr"].copy_(lr)
            else:  # a constant lambda
                group["lr"].fill_(lr)

    def get_last_lr(self):
        """The param groups' lrs: 0-d tensors (copies), as set by the last step()."""
        return [group["lr"].clone() for group in self.optimizer.param_groups]

    def state_dict(self):
        """{"steps_taken": int, "base_lrs": [float]} (reading the count is a host sync)."""
        return {"steps_taken": int(self._steps_taken), "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state_dict):
        self.base_lrs = list(state_dict["base_lrs"])
        self._steps_taken.fill_(int(state_dict["steps_taken"]))
        self._write_lrs()

"""GradScaler: torch.amp.GradScaler's API and state_dict with fusedtrain's fused passes, and
the one-read clipped step.

The scaler hands the scale to fusedtrain's optimizers instead of unscaling the gradients
(they unscale as they read), checks for inf/NaN in one read-only pass per (device, dtype),
and never syncs the host; how each method works: docs/design.md §7.
"""
import functools
import operator
from collections import defaultdict

import torch
from torch.amp.grad_scaler import OptState

from fusedtrain import _dtensor, _tables
from fusedtrain.ops.unscale import combine_norm, unscale_sumsq_

__all__ = ["GradScaler", "OptState", "clipped_step_"]


# per-tensor attribute reads as C-level maps in eager mode: the host's share of a step at a
# thousand params (fusedtrain/benchmarks/amp.py, the "host:" rows). Dynamo cannot call an
# attrgetter: while torch.compile traces, the same reads are spelled as comprehensions.
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


def _grads_of(optimizer):
    """The grads of the optimizer's params that have one, in parameter order."""
    if torch.compiler.is_compiling():
        return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return [g for group in optimizer.param_groups for g in map(_GRAD, group["params"]) if g is not None]


def _any_sparse(grads):
    if torch.compiler.is_compiling():
        return any(g.is_sparse for g in grads)
    return any(map(_IS_SPARSE, grads))


def _has_step_scaled(optimizer):
    return bool(getattr(optimizer, "_step_supports_grad_mult", False))


def _step_with(optimizer, grad_mult, found_inf, *args, **kwargs):
    """optimizer.step() -- so step hooks, profilers and the LR schedulers' bookkeeping see the
    step -- with the gradient multiplier and the skip flag handed over as attributes, the way
    torch's GradScaler hands grad_scale/found_inf to its fused optimizers."""
    optimizer.grad_mult, optimizer.found_inf = grad_mult, found_inf
    try:
        return optimizer.step(*args, **kwargs)
    finally:
        del optimizer.grad_mult, optimizer.found_inf


def clipped_step_(optimizer, max_norm, *, inv_scale=None, found_inf=None):
    """The one-read clipped optimizer step, without a GradScaler.

    optimizer: a fusedtrain FusedAdam/FusedAdamW. inv_scale: optional one-element fp32 device
    tensor the gradients are multiplied by (1 / loss scale). found_inf: optional one-element
    fp32 device tensor; it is set when a gradient holds inf/NaN, and then the step is skipped
    on the device (params, state and step untouched).

    Pass 1 reads every gradient once (found_inf and the L2 norm of grad * inv_scale, nothing
    written); pass 2 is the optimizer's fused kernel with every gradient multiplied by
    inv_scale * min(1, max_norm / (norm + 1e-6)) as it is read -- torch's clip_grad_norm_
    coefficient. No host sync. Returns the total norm (0-d fp32 tensor on found_inf's device).
    """
    if not _has_step_scaled(optimizer):
        raise TypeError(f"clipped_step_: optimizer must be a fusedtrain FusedAdam/FusedAdamW (an optimizer with "
                        f"_step_supports_grad_mult), got {type(optimizer).__name__}")
    grads = _grads_of(optimizer)
    if _any_sparse(grads):
        raise RuntimeError("clipped_step_: sparse gradients are not supported (FusedAdam does not support them)")
    sharded = []
    if _dtensor.any_dtensor(grads):  # one look at the grads' types, not a call per grad
        sharded = [g for g in grads if _dtensor.is_dtensor(g)]
        grads = [_dtensor.local(g) for g in grads]
    if found_inf is None:
        device = inv_scale.device if inv_scale is not None else (grads[0].device if grads else torch.device("cpu"))
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
    mult = inv_scale if inv_scale is not None else torch.ones((), dtype=torch.float32, device=found_inf.device)
    sums = unscale_sumsq_(grads, mult, found_inf, compute_norm=True, write=False,
                          owner_of=functools.partial(_tables.grad_owner, optimizer))
    if sharded:  # FSDP2: the flag and the norm over every rank's shard
        sums = {d: s.clone() for d, s in sums.items()}
        _dtensor.reduce_across_shards_(sharded, [found_inf], list(sums.values()))
    total_norm = combine_norm(sums, found_inf.device)
    clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    _step_with(optimizer, (mult.to(clip_coef.device) * clip_coef).reshape(()), found_inf)
    return total_norm


class GradScaler(torch.amp.GradScaler):
    """Drop-in torch.amp.GradScaler (same constructor, methods and state_dict) whose
    unscale/inf-check is fusedtrain's one-launch-per-group pass, and which hands the scale to
    fused optimizers without a host sync (docs/design.md §7)."""

    _last_clip_active = False  # did the last clip_grad_norm_ clip (CPU pass planning)

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True) -> None:
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)

    def _check_scale_growth_tracker(self, funcname):
        # torch's check, here so that torch.compile traces it (Dynamo skips torch/amp/)
        fix = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."
        if self._scale is None:
            raise AssertionError(f"Attempted {funcname} but _scale is None.  " + fix)
        if self._growth_tracker is None:
            raise AssertionError(f"Attempted {funcname} but _growth_tracker is None.  " + fix)
        return self._scale, self._growth_tracker

    def _state_of(self, optimizer):
        """torch's per-optimizer record, created by an explicit assignment: under torch.compile
        Dynamo drops an entry that the defaultdict's factory creates (torch 2.14)."""
        st = self._per_optimizer_states.get(id(optimizer))
        if st is None:
            # torch's _refresh_per_optimizer_state(), spelled here: Dynamo will not call into torch.amp
            st = self._per_optimizer_states[id(optimizer)] = {"stage": OptState.READY, "found_inf_per_device": {}}
        return st

    # ---- gathering gradients ------------------------------------------------------------
    @staticmethod
    def _grads_per_device(optimizer, allow_fp16, replace_sparse=True):
        """({device: [grad tensors to process]} in parameter order, [DTensor grads]). Sparse
        grads: their values, fp16 sparse grads coalesced first, exactly as torch does; DTensor
        grads (FSDP2): their local shards."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not torch.compiler.is_compiling() and all(issubclass(t, torch.Tensor) for t in set(map(type, params))):
            # the common case without a Python step per grad: dense local grads on one device
            grads = [g for g in map(_GRAD, params) if g is not None]
            if not any(map(_IS_SPARSE, grads)) and not _dtensor.any_dtensor(grads):
                if not allow_fp16 and torch.float16 in set(map(_DTYPE, grads)):
                    raise ValueError("Attempting to unscale FP16 gradients.")
                devices = set(map(_DEVICE, grads))
                if len(devices) == 1:
                    return {devices.pop(): grads}, []
        per_device = defaultdict(list)
        sharded = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if not isinstance(param, torch.Tensor):
                        raise AssertionError(f"expected param to be torch.Tensor, got {type(param).__name__}")
                    if param.grad is None:
                        continue
                    if (not allow_fp16) and param.grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    if param.grad.is_sparse:
                        if param.grad.dtype is torch.float16 and replace_sparse:
                            param.grad = param.grad.coalesce()
                        g = param.grad._values()
                    elif _dtensor.is_dtensor(param.grad):
                        sharded.append(param.grad)
                        g = _dtensor.local(param.grad)
                    else:
                        g = param.grad
                    per_device[g.device].append(g)
        return per_device, sharded

    def _inv_scale(self):
        # as torch: the reciprocal in fp64, then fp32
        return self._scale.double().reciprocal().float()

    def _pass(self, optimizer, inv_scale, allow_fp16, write, compute_norm=False, found=None):
        """Run the fused pass over the optimizer's grads: ({device: found_inf},
        {device: sum of squares}). Always records a found_inf on the scale's device, so an
        optimizer without gradients still steps and updates."""
        per_device, sharded = self._grads_per_device(optimizer, allow_fp16)
        home = self._scale.device
        found_per_device = {}
        sums = {}
        devices = [home] + [d for d in per_device if d != home]
        inv_cache = {}
        for dev in devices:
            f = found.get(dev) if found is not None else None
            if f is None:
                f = torch.zeros((), dtype=torch.float32, device=dev)
            found_per_device[dev] = f
            grads = per_device.get(dev, [])
            if not grads:
                continue
            if dev not in inv_cache:
                inv_cache[dev] = inv_scale if inv_scale.device == dev else inv_scale.to(dev, non_blocking=True)
            s = unscale_sumsq_(grads, inv_cache[dev], f, compute_norm=compute_norm, write=write,
                               owner_of=functools.partial(_tables.grad_owner, optimizer))
            sums.update(s)
        if sharded:  # FSDP2: every rank must see an inf on any rank's shard, and the whole norm
            _dtensor.reduce_across_shards_(sharded, list(found_per_device.values()), list(sums.values()))
        return found_per_device, sums

    # ---- torch's hooks, reimplemented on the fused pass ----------------------------------
    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        # torch's signature; found_inf is torch's fresh zero on the scale's device
        found, _ = self._pass(optimizer, inv_scale, allow_fp16, write=True,
                              found={found_inf.device: found_inf})
        return found

    def _check_inf_per_device(self, optimizer):
        # torch multiplies every grad by 1.0 here; a read-only pass gives the same flags
        self._check_scale_growth_tracker("_check_inf_per_device")
        ones = torch.ones((), dtype=torch.float32, device=self._scale.device)
        found, _ = self._pass(optimizer, ones, True, write=False)
        self._state_of(optimizer)["found_inf_per_device"] = found
        return found

    def _found_inf_sum(self, optimizer_state):
        dev = self._scale.device
        vals = [t.to(dev, non_blocking=True) for t in optimizer_state["found_inf_per_device"].values()]
        return vals[0] if len(vals) == 1 else sum(vals)

    # ---- step ------------------------------------------------------------------------------
    def step(self, optimizer, *args, max_norm=None, **kwargs):
        """torch.amp.GradScaler.step, on the fused passes (docs/design.md §7).

        Args:
            optimizer: the optimizer to step.
            *args, **kwargs: passed to optimizer.step().
            max_norm: clip the unscaled gradients to this global L2 norm first; for
                fusedtrain's optimizers the one-read clipped step. Then returns the total norm.
        """
        if not self._enabled:
            if max_norm is not None:
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._state_of(optimizer)
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if max_norm is not None and _has_step_scaled(optimizer):
            return self._clipped_step(optimizer, optimizer_state, max_norm)
        if max_norm is not None:
            total_norm = self.clip_grad_norm_(optimizer, max_norm)
            self.step(optimizer, *args, **kwargs)
            return total_norm

        if _has_step_scaled(optimizer):
            if optimizer_state["stage"] is OptState.READY:
                grad_mult = self._inv_scale()
                found, _ = self._pass(optimizer, grad_mult, True, write=False)
                optimizer_state["found_inf_per_device"] = found
            else:  # unscale_ already ran: the grads are unscaled, found_inf recorded
                grad_mult = None
            retval = _step_with(optimizer, grad_mult, self._found_inf_sum(optimizer_state), *args, **kwargs)
            optimizer_state["stage"] = OptState.STEPPED
            return retval

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # torch's protocol for its own fused optimizers (torch/amp/grad_scaler.py)
            return super().step(optimizer, *args, **kwargs)

        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) == 0:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        retval = self._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def _clipped_step(self, optimizer, optimizer_state, max_norm):
        home = self._scale.device
        if optimizer_state["stage"] is OptState.READY:
            found = torch.zeros((), dtype=torch.float32, device=home)
            total_norm = clipped_step_(optimizer, max_norm, inv_scale=self._inv_scale(), found_inf=found)
            optimizer_state["found_inf_per_device"] = {home: found}
        else:  # unscale_ already ran: grads are unscaled and found_inf recorded; only the norm is new
            total_norm = clipped_step_(optimizer, max_norm, found_inf=self._found_inf_sum(optimizer_state))
        optimizer_state["stage"] = OptState.STEPPED
        return total_norm

    # ---- clipping ----------------------------------------------------------------------------
    def clip_grad_norm_(self, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """``scaler.unscale_(optimizer); torch.nn.utils.clip_grad_norm_(params, max_norm)`` in
        a read-only check+norm pass and one scaling pass (x * inv_scale * clip_coef, rounded
        once); no host sync unless error_if_nonfinite.

        Args:
            optimizer: whose gradients to unscale (unless unscale_ already ran) and clip.
            max_norm, norm_type, error_if_nonfinite: as torch.nn.utils.clip_grad_norm_ (a
                norm_type other than 2 or sparse gradients take torch's own path).

        Returns:
            The total norm of the unscaled gradients (0-d fp32 on the scale's device;
            nonfinite when a gradient is).
        """
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not self._enabled:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
        self._check_scale_growth_tracker("clip_grad_norm_")
        optimizer_state = self._state_of(optimizer)
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("clip_grad_norm_() is being called after step().")
        if float(norm_type) != 2.0 or any(p.grad.is_sparse for p in params):
            # not the fused case: torch's own path
            if optimizer_state["stage"] is OptState.READY:
                self.unscale_(optimizer)
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)

        home = self._scale.device
        # On CPU a host read of the norm costs nothing: when the previous clip did not clip,
        # pass 1 unscales in place while it takes the norm (one read, one write) and the
        # scaling pass runs only when this call clips. Otherwise -- and always on a GPU, where
        # that read would sync -- pass 1 only reads, and one scaling pass applies
        # inv_scale * clip_coef (two reads, one write). Clipping tends to stay on or off
        # for many steps, so the previous call is the guess.
        on_cpu = home.type == "cpu" and all(p.grad.device.type == "cpu" for p in params)
        unscale_first = on_cpu and not self._last_clip_active and optimizer_state["stage"] is OptState.READY
        if optimizer_state["stage"] is OptState.READY:
            inv = self._inv_scale()
            found, sums = self._pass(optimizer, inv, False, write=unscale_first, compute_norm=True)
            optimizer_state["found_inf_per_device"] = found
            optimizer_state["stage"] = OptState.UNSCALED
        else:  # already unscaled: norm of the grads as they are; found_inf already recorded
            inv = torch.ones((), dtype=torch.float32, device=home)
            found, sums = self._pass(optimizer, inv, True, write=False, compute_norm=True)
        total_norm = combine_norm(sums, home)
        if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
                "set `error_if_nonfinite=False`")
        # torch.nn.utils.clip_grad_norm_'s coefficient
        clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        if on_cpu:
            self._last_clip_active = not bool(clip_coef >= 1.0)  # a NaN coefficient scales, as torch's does
        if unscale_first:
            if self._last_clip_active:
                self._pass(optimizer, clip_coef.reshape(()), True, write=True, found=found)
        else:
            self._pass(optimizer, inv * clip_coef, True, write=True, found=found)
        return total_norm

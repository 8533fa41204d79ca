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
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state

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
    on the device (params, state and step untouched). It is the step's skip flag: pass a
    zeroed one to read it afterwards (a nonzero one skips the step whatever the gradients).

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
    fused optimizers without a host sync (docs/design.md §7).

    Also counts the steps it took and skipped on the device (steps_taken(), steps_skipped(),
    last_step_skipped(); also in state_dict()), and traces under torch.compile without a graph
    break of its own."""

    _last_clip_active = False  # did the last clip_grad_norm_ clip (CPU pass planning)
    # step bookkeeping (docs/design.md §7): device counters, made at the first step; until then
    # (and for a pickled scaler) the counts a state_dict brought, as torch keeps _init_scale
    _steps = _skipped = None  # int64 0-d: scaler.step() calls counted, and the skipped ones
    _init_steps = _init_skipped = 0
    _last_skipped_any = None  # bool 0-d: the last step()'s skip flag, whichever optimizer

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True) -> None:
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)
        self._last_skipped = {}  # id(optimizer) -> its last step()'s skip flag; kept past update()

    # ---- torch's scale/unscale_/update, spelled here so that torch.compile traces them --------
    # (Dynamo skips every function in torch/amp/: each call would be a graph break)
    def scale(self, outputs):
        """torch.amp.GradScaler.scale: outputs times the scale (a tensor, or an iterable of them)."""
        if not self._enabled or not isinstance(outputs, torch.Tensor):
            return super().scale(outputs)
        if self._scale is None:
            self._lazy_init_scale_growth_tracker(outputs.device)
        return outputs * self._scale.to(device=outputs.device, non_blocking=True)

    def _lazy_init_scale_growth_tracker(self, dev):
        if self._growth_tracker is not None:
            raise AssertionError("_growth_tracker initialized before _scale")
        self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=dev)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=dev)
        if self._steps is None:  # made with the scale: a compiled step sees them from its first trace
            self._make_counters(dev)

    def unscale_(self, optimizer):
        """torch.amp.GradScaler.unscale_: divide the optimizer's gradients by the scale in
        place (one fused unscale-and-check pass per (device, dtype)), recording found_inf."""
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        optimizer_state = self._state_of(optimizer)
        if optimizer_state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        found_inf = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        optimizer_state["found_inf_per_device"] = self._unscale_grads_(optimizer, self._inv_scale(), found_inf, False)
        optimizer_state["stage"] = OptState.UNSCALED

    def update(self, new_scale=None):
        """torch.amp.GradScaler.update: back the scale off if any optimizer's step this iteration
        found an inf/NaN, grow it after growth_interval clean iterations; or set new_scale."""
        if not self._enabled:
            return
        if new_scale is not None:
            return super().update(new_scale)
        scale, growth_tracker = self._check_scale_growth_tracker("update")
        found_infs = [found_inf.to(device=scale.device, non_blocking=True)
                      for state in self._per_optimizer_states.values()
                      for found_inf in state["found_inf_per_device"].values()]
        if not found_infs:
            raise AssertionError("No inf checks were recorded prior to update.")
        found_inf_combined = found_infs[0]
        for found_inf in found_infs[1:]:
            found_inf_combined += found_inf  # in place, as torch does
        torch._amp_update_scale_(scale, growth_tracker, found_inf_combined, self._growth_factor,
                                 self._backoff_factor, self._growth_interval)
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

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
        # as torch: the reciprocal in fp64, then fp32 (MPS has no fp64: fp32 there, as torch)
        if self._scale.device.type == "mps":
            return self._scale.reciprocal()
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

        Every call counts one step, taken or skipped (steps_taken(), steps_skipped(),
        last_step_skipped()).
        """
        if not self._enabled:
            total_norm = None
            if max_norm is not None:
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            retval = optimizer.step(*args, **kwargs)
            self._count_step(optimizer, None)
            return retval if max_norm is None else total_norm
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
            self.step(optimizer, *args, **kwargs)  # counts the step
            return total_norm

        if _has_step_scaled(optimizer):
            if optimizer_state["stage"] is OptState.READY:
                grad_mult = self._inv_scale()
                found, _ = self._pass(optimizer, grad_mult, True, write=False)
                optimizer_state["found_inf_per_device"] = found
            else:  # unscale_ already ran: the grads are unscaled, found_inf recorded
                grad_mult = None
            found_inf = self._found_inf_sum(optimizer_state)
            retval = _step_with(optimizer, grad_mult, found_inf, *args, **kwargs)
            optimizer_state["stage"] = OptState.STEPPED
            self._count_step(optimizer, found_inf)
            return retval

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # torch's protocol for its own fused optimizers (torch/amp/grad_scaler.py)
            retval = super().step(optimizer, *args, **kwargs)
            self._count_step(optimizer, self._found_inf_sum(optimizer_state))
            return retval

        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) == 0:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        retval = self._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        self._count_step(optimizer, self._found_inf_sum(optimizer_state))
        return retval

    def _clipped_step(self, optimizer, optimizer_state, max_norm):
        home = self._scale.device
        if optimizer_state["stage"] is OptState.READY:
            found = torch.zeros((), dtype=torch.float32, device=home)
            total_norm = clipped_step_(optimizer, max_norm, inv_scale=self._inv_scale(), found_inf=found)
            optimizer_state["found_inf_per_device"] = {home: found}
        else:  # unscale_ already ran: grads are unscaled and found_inf recorded; only the norm is new
            found = self._found_inf_sum(optimizer_state)
            total_norm = clipped_step_(optimizer, max_norm, found_inf=found)
        optimizer_state["stage"] = OptState.STEPPED
        self._count_step(optimizer, found)
        return total_norm

    # ---- step bookkeeping: taken and skipped steps, on the device ------------------------------
    def _count_step(self, optimizer, found_inf):
        """Count one step() of optimizer: skipped when found_inf (its gradients' inf/NaN flag,
        summed over devices, on the scale's device) is nonzero; None: a disabled scaler's step,
        always taken. Three tiny ops on the device, none per parameter, no host sync."""
        if self._steps is None:  # a disabled scaler (an enabled one made them with its scale)
            self._make_counters(self._counter_device())
        if found_inf is None:
            skipped = torch.zeros((), dtype=torch.bool, device=self._steps.device)
        else:
            skipped = found_inf.to(self._steps.device, non_blocking=True) > 0
            self._skipped.add_(skipped)
        self._steps.add_(1)
        self._last_skipped[id(optimizer)] = self._last_skipped_any = skipped

    def _make_counters(self, device):
        self._steps = torch.full((), self._init_steps, dtype=torch.int64, device=device)
        self._skipped = torch.full((), self._init_skipped, dtype=torch.int64, device=device)

    def _counter_device(self):
        if self._enabled and self._scale is not None:
            return self._scale.device
        dev = torch.device(self._device)  # a disabled scaler: its device, if there is one
        return dev if dev.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")

    def _counts(self):
        """(steps counted, steps skipped): the counters, or the counts a state_dict brought."""
        if self._steps is not None:
            return self._steps, self._skipped
        device = self._counter_device()
        return (torch.tensor(self._init_steps, dtype=torch.int64, device=device),
                torch.tensor(self._init_skipped, dtype=torch.int64, device=device))

    def steps_taken(self):
        """How many scaler.step(optimizer) calls applied the optimizer's update: a 0-d int64
        tensor on the scale's device (a snapshot), read without a host sync.

        Each step() call counts once, for the optimizer it was given: skipped when that
        optimizer's gradients held an inf/NaN (torch skips exactly those), taken otherwise
        (always, when the scaler is disabled); with two optimizers per iteration, two per
        iteration. The counts are in state_dict() (an enabled scaler's) and start at 0 when a
        state_dict lacks them (torch's).
        """
        steps, skipped = self._counts()
        return steps - skipped

    def steps_skipped(self):
        """How many scaler.step(optimizer) calls skipped the update for an inf/NaN gradient:
        a 0-d int64 tensor on the scale's device (a snapshot); counted as steps_taken()."""
        return self._counts()[1].clone()

    def last_step_skipped(self, optimizer=None):
        """Whether the last scaler.step(optimizer) skipped the update: a 0-d bool tensor on the
        scale's device, without a host sync (``bool()`` of it is one). Without an optimizer:
        the last step() of any optimizer. Kept past update(), until the next step().

        Raises RuntimeError when step() has not been called (for that optimizer)."""
        skipped = self._last_skipped_any if optimizer is None else self._last_skipped.get(id(optimizer))
        if skipped is None:
            raise RuntimeError("last_step_skipped(): scaler.step() has not been called"
                               + ("" if optimizer is None else " for this optimizer"))
        return skipped

    def state_dict(self):
        """torch.amp.GradScaler's state_dict plus "steps_taken" and "steps_skipped" (ints;
        torch's load_state_dict ignores them). A disabled scaler's is torch's empty dict."""
        state = super().state_dict()
        if state:
            steps, skipped = (int(v) for v in torch.stack(self._counts()).tolist())
            state["steps_taken"], state["steps_skipped"] = steps - skipped, skipped
        return state

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, and the step counts when the dict has them (else 0)."""
        super().load_state_dict(state_dict)
        if not self._enabled:
            return
        skipped = int(state_dict.get("steps_skipped", 0))
        self._init_steps, self._init_skipped = int(state_dict.get("steps_taken", 0)) + skipped, skipped
        if self._steps is not None:
            self._steps.fill_(self._init_steps)
            self._skipped.fill_(self._init_skipped)

    def __getstate__(self):
        # as torch does for the scale: ints in the pickle, tensors made again at first use
        state = super().__getstate__()
        steps, skipped = (int(v) for v in torch.stack(self._counts()).tolist())
        state.update(_init_steps=steps, _init_skipped=skipped, _steps=None, _skipped=None,
                     _last_skipped={}, _last_skipped_any=None)
        return state

    def __setstate__(self, state):
        super().__setstate__({"_last_skipped": {}, **state})  # a pickle from before the bookkeeping

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

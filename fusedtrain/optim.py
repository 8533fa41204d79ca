"""FusedAdam / FusedAdamW: torch.optim.Adam / AdamW with one fused kernel launch per
(param group, device, dtype) per step.

Same constructor, param_groups keys, state keys and state_dict as torch 2.14's Adam/AdamW
(a state_dict saved by one loads into the other and training continues on the same
trajectory), plus `master_weights=True`: an fp32 copy of every fp16/bf16 param (state key
`master_param`) and fp32 states, the update running on the copy.

AMP: `_step_supports_amp_scaling = True`. torch.amp.GradScaler sets `optimizer.grad_scale`
(None when unscale_ already ran) and `optimizer.found_inf` before calling step(); step() then
unscales inside the kernel (grad_mult = 1 / grad_scale, computed on the device) and skips
the whole update on the device when found_inf is nonzero. fusedtrain.GradScaler instead sets
`optimizer.grad_mult` (1 / scale, times the clip coefficient in the one-read clipped step)
with `found_inf` (`_step_supports_grad_mult = True`); step() then delegates to
`_step_scaled(grad_mult, found_inf)`.
"""
import itertools
import operator

import torch

from fusedtrain import _dtensor, _ext
from fusedtrain._optim_state import StateMap, Version
from fusedtrain.ops import adam as adam_ops

_LOW = (torch.float16, torch.bfloat16)


def _scalar(x):
    return float(x.item()) if torch.is_tensor(x) else float(x)


class FusedAdam(torch.optim.Optimizer):
    """torch.optim.Adam with a fused step. Extra keyword: master_weights (fp32 master copy
    and fp32 states for fp16/bf16 params). The constructor rejects what torch.optim.Adam's
    rejects, with the same exception type and message; foreach/fused are accepted and ignored
    (both True: torch's RuntimeError); differentiable=True is not supported."""

    _step_supports_amp_scaling = True
    _step_supports_grad_mult = True  # fusedtrain.GradScaler hands grad_mult + found_inf to step()

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights=False):
        # torch.optim.Adam.__init__'s checks, in its order, with its exception types and
        # messages (torch 2.14); fusedtrain's own restrictions come after them
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for i in (0, 1):
            if isinstance(betas[i], torch.Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
                if betas[i].numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        # torch's _to_scalar: a 1-element tensor of any shape is kept as a 0-d tensor
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b
                      for b in (betas[0], betas[1]))
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights)
        super().__init__(params, defaults)
        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: its update is a "
                             "fused kernel outside autograd (use torch.optim.Adam(differentiable=True))")

    @property
    def state(self):
        """param -> dict of state tensors, as torch keeps it; an entry assigned or removed
        here (not only in place) is what the next step uses (fusedtrain/_optim_state.py)."""
        return self.__dict__["_state_map"]

    @state.setter
    def state(self, value):
        box = self.__dict__.setdefault("_state_box", Version())
        self.__dict__["_state_map"] = value if isinstance(value, StateMap) and value._version is box \
            else StateMap(box, value)
        box.bump()

    def state_dict(self):
        sd = super().state_dict()
        # plain dicts: a checkpoint loads without fusedtrain and with weights_only=True
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    def __setstate__(self, state):
        state = dict(state)
        st = state.pop("state", None)
        super().__setstate__(state)
        if st is not None:
            self.state = st
        self._states_changed()
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = self._step_tensor(st["step"], p)

    @staticmethod
    def _step_tensor(step, p):
        # our step is an fp32 tensor on the param's device (as torch fused/capturable keep it);
        # a copy, so that a loaded state never aliases the dict it came from
        if torch.is_tensor(step):
            return step.detach().to(device=p.device, dtype=torch.float32, copy=True).reshape(())
        return torch.tensor(float(step), dtype=torch.float32, device=p.device)

    def load_state_dict(self, state_dict):
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts every state to the param dtype; master-weight groups keep fp32 states
        # (and their fp32 master copies) from the saved dict.
        saved_ids = [i for g in saved_groups for i in g["params"]]
        ours = [(p, g) for g in self.param_groups for p in g["params"]]
        for sid, (p, group) in zip(saved_ids, ours):
            st = self.state.get(p)
            if not st:
                continue
            sv = saved_state.get(sid, {})
            if self._uses_master(group, p):
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if k in sv:
                        st[k] = sv[k].detach().to(device=p.device, dtype=torch.float32, copy=True)
                if "master_param" in sv:
                    st["master_param"] = sv["master_param"].detach().to(device=p.device, dtype=torch.float32,
                                                                          copy=True)
                else:
                    st["master_param"] = p.detach().float().clone()
            else:
                st.pop("master_param", None)
        self._states_changed()

    @staticmethod
    def _uses_master(group, p):
        return bool(group.get("master_weights")) and p.dtype in _LOW

    def _init_state(self, group, p):
        self._states_changed()
        state = self.state[p]
        master = self._uses_master(group, p)
        sdtype = torch.float32 if master else p.dtype
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        if master:
            state["master_param"] = p.detach().float().clone(memory_format=torch.preserve_format)

    def _plan(self, group, ps, key=None):
        """[(device, params, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters), trusted)] per
        (device, dtype) of this group's params with grads: built once and reused while the
        same params have grads and no state was created or loaded (the per-step cost is then
        the grads alone)."""
        plans = self.__dict__.setdefault("_plans", {})
        if key is None:
            key = self._plan_key(group, ps)
        hit = plans.get(id(group))
        if hit is not None and hit[0] == key:
            return hit[1]
        buckets = {}
        for p in ps:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        out = []
        for (dev, _), bp in buckets.items():
            sts = [self.state[p] for p in bp]
            master = self._uses_master(group, bp[0])
            lists = ([s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts],
                     [s["max_exp_avg_sq"] for s in sts] if group["amsgrad"] else [],
                     [s["step"] for s in sts], [s["master_param"] for s in sts] if master else [])
            # trusted: states as this class creates them (validated once here, not every step)
            sdt = torch.float32 if master else bp[0].dtype
            trusted = all(
                p.is_contiguous() and all(t.is_contiguous() and t.shape == p.shape and t.dtype == sdt
                                          and t.device == p.device for t in (s["exp_avg"], s["exp_avg_sq"]))
                and (not group["amsgrad"] or (s["max_exp_avg_sq"].is_contiguous()
                                              and s["max_exp_avg_sq"].shape == p.shape
                                              and s["max_exp_avg_sq"].dtype == sdt))
                and (not master or (s["master_param"].is_contiguous() and s["master_param"].shape == p.shape))
                and torch.is_tensor(s["step"]) and s["step"].dtype == torch.float32 and s["step"].device == p.device
                for p, s in zip(bp, sts))
            # DTensor params (FSDP2): the kernels run on the local shards, states included
            lists = tuple([_dtensor.local(t) for t in lst] for lst in lists)
            # bp_local is bp itself when no param is a DTensor (step() then reads grads as they are)
            bp_local = [_dtensor.local(p) for p in bp]
            if all(a is b for a, b in zip(bp_local, bp)):
                bp_local = bp
            out.append((dev, bp, bp_local, lists, trusted))
        plans[id(group)] = (key, out)
        return out

    def _plan_key(self, group, ps):
        return (tuple(map(id, ps)), bool(group["amsgrad"]), bool(group.get("master_weights")),
                self.__dict__["_state_box"].n)

    def _plan_is_current(self, group, key):
        hit = self.__dict__.get("_plans", {}).get(id(group))
        return hit is not None and hit[0] == key

    def _states_changed(self):
        self.__dict__.setdefault("_state_box", Version()).bump()

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._states_changed()

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. Honors torch.amp.GradScaler's `grad_scale` / `found_inf`
        attributes: grads are unscaled inside the kernel, and a nonzero found_inf skips the
        update on the device (params, states and step bit-identical)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_mult = getattr(self, "grad_mult", None)  # set by fusedtrain.GradScaler
        if grad_mult is None and grad_scale is not None:
            grad_mult = (torch.reciprocal(grad_scale.to(torch.float32)) if torch.is_tensor(grad_scale)
                         else torch.tensor(1.0 / float(grad_scale), dtype=torch.float32))
        self._step_scaled(grad_mult=grad_mult, found_inf=found_inf)
        return loss

    @torch.no_grad()
    def _step_scaled(self, grad_mult=None, found_inf=None):
        """One step exactly like step(), every gradient multiplied by `grad_mult` as the
        kernel reads it, and nothing written anywhere (params, states, step) when
        `found_inf` is nonzero. Both are optional one-element fp32 tensors (any device; they
        are moved to each param device without a host sync). Used by fusedtrain.GradScaler."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", None)
        if check is not None:
            check()
        # 1. gather: (group, [params with grad]) — validation of every grad before any state is
        #    created or any tensor written
        work = []
        grads_of = getattr(_ext._C, "grads_of", None)
        for group in self.param_groups:
            params = group["params"]
            # each .grad read once per step; in C++ when every param is a plain tensor with a grad
            gs = grads_of(params) if grads_of is not None else None
            if gs is not None:
                ps = params
            else:
                gs = [p.grad for p in params]
                if all(map(operator.is_not, gs, itertools.repeat(None))):
                    ps = params
                else:
                    ps = [p for p, g in zip(params, gs) if g is not None]
                    gs = [g for g in gs if g is not None]
            if ps:
                work.append((group, ps, gs, self._plan_key(group, ps)))
        if not work:
            return
        created = []
        try:
            # 2. lazy state init (skipped when this group's plan is current: all have state);
            #    the grads are validated by adam_ops.prepare below, before anything is written,
            #    and a failure removes the states created here
            for group, ps, _, key in work:
                if not self._plan_is_current(group, key):
                    for p in ps:
                        if len(self.state[p]) == 0:
                            self._init_state(group, p)
                            created.append(p)
            # 3. prepare every (group, device, dtype) call: validation, no writes
            calls = []
            per_dev = {}

            def on(dev, t):
                if t is None or not torch.is_tensor(t):
                    return t
                slot = (id(t), dev)
                if slot not in per_dev:
                    per_dev[slot] = t.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(1)
                return per_dev[slot]

            for group, ps, gs, key in work:
                beta1, beta2 = group["betas"]
                lr = group["lr"]
                # the key again after any state creation above (which changes it)
                plan = self._plan(group, ps, None if created else key)
                for (dev, bp, bp_local, sts_lists, trusted) in plan:
                    exp_avgs, exp_avg_sqs, max_sqs, steps, masters = sts_lists
                    calls.append(adam_ops.prepare(
                        # one (device, dtype) bucket holds ps in order: its grads are gs
                        bp_local, (gs if len(plan) == 1 else [p.grad for p in bp]) if bp_local is bp
                        else [_dtensor.local(p.grad) for p in bp],
                        exp_avgs, exp_avg_sqs, max_sqs, steps, masters,
                        lr=lr if torch.is_tensor(lr) else float(lr), beta1=_scalar(beta1), beta2=_scalar(beta2),
                        eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                        amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                        decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                        grad_mult=on(dev, grad_mult), found_inf=on(dev, found_inf), trusted_states=trusted))
        except BaseException:
            for p in created:  # a failed step leaves no trace
                self.state.pop(p, None)
            if created:
                self._states_changed()
            raise
        # 4. launch: one kernel per (group, device, dtype)
        for c in calls:
            if c is not None:
                adam_ops.launch(c)


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW with a fused step (decoupled weight decay, default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

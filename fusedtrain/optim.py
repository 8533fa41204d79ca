"""FusedAdam / FusedAdamW: torch.optim.Adam / AdamW whose step is one fused kernel launch per
(param group, device, dtype), and which unscale AMP gradients as they read them.

The step follows torch.optim.Adam's: gather each group (`_init_group`, which Dynamo runs
eagerly under torch.compile), then one fusedtrain::adam_ call per group. How the AMP
protocol and master weights work: docs/design.md §7.
"""
import itertools
import math
import operator

import torch

from fusedtrain import _dtensor, reference
from fusedtrain.ops import adam as adam_ops

_EXP_AVG, _EXP_AVG_SQ, _MAX_EXP_AVG_SQ, _STEP = map(operator.itemgetter,
                                                   ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"))

_LOW = (torch.float16, torch.bfloat16)


def _scalar(x):
    return float(x.item()) if torch.is_tensor(x) else float(x)


STATE_FORMATS = ("fp32", "bf16", "8bit")
# the 8-bit states' block absmax, under these keys next to their states (reference.q8_*)
_ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax",
                "max_exp_avg_sq": "max_exp_avg_sq_absmax"}
# param-group keys of fusedtrain's own (torch's Adam has none of them)
_GROUP_KEYS = ("master_weights", "state_format", "stochastic_rounding", "sr_seed")
# reshardable_state_dict's marker on a state whose 8-bit moments it decoded
_DECODED_KEY = "q8_decoded"
LEAN_MIN_NUMEL = 4096  # smaller tensors keep full-precision moments (as bitsandbytes and torchao do)


def _check_state_format(fmt):
    if fmt not in STATE_FORMATS:
        raise ValueError(f"state_format must be one of {STATE_FORMATS}, got {fmt!r}")
    return fmt


def _lean_dtype(group, p):
    """The moments' dtype of param p under its group's state_format, or None for the default."""
    fmt = _check_state_format(group.get("state_format", "fp32"))
    if fmt == "fp32" or p.numel() < LEAN_MIN_NUMEL:
        return None
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"state_format={fmt!r} is for float32/float16/bfloat16 params; a param of shape "
                         f"{tuple(p.shape)} is {p.dtype} (put it in a param group with state_format='fp32')")
    return torch.bfloat16 if fmt == "bf16" else torch.uint8


def _row_blocks(p):
    """For a DTensor param whose shards are whole rows of a multiple of Q8_BLOCK elements
    (sharded on dim 0 only: FSDP2's default, a weight with in_features a multiple of 256), the
    number of blocks per row; else None. Such a param's blocks are the blocks of the whole
    tensor, so its absmax can be a DTensor of shape (rows, blocks per row) sharded as the param
    is, and torch.distributed.checkpoint moves codes and absmax together to any world size."""
    if p.dim() == 0 or any(place.is_shard() and place.dim != 0 for place in p.placements):
        return None
    inner = math.prod(p.shape[1:])
    return inner // reference.Q8_BLOCK if inner % reference.Q8_BLOCK == 0 else None


def _new_absmax(p):
    """Zeros for the block absmax of an 8-bit state of p. A DTensor param (FSDP2) gets a DTensor:
    (rows, blocks per row) sharded as p where p's shards are whole blocks (_row_blocks: any world
    size loads it); otherwise (shards, blocks), one row per rank holding the blocks of its own
    shard, padded to the blocks of the largest shard (a checkpoint loads into the same sharding
    only). _init_group hands the kernel the blocks of the local shard (_local_blocks)."""
    if not _dtensor.is_dtensor(p):
        return torch.zeros(reference.q8_num_blocks(p.numel()), dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import Replicate, Shard

    local_p, mesh = p.to_local(), p.device_mesh
    per_row = _row_blocks(p)
    if per_row is not None:
        local = torch.zeros(local_p.shape[0], per_row, dtype=torch.float32, device=local_p.device)
        return type(p).from_local(local, mesh, p.placements, run_check=False, shape=(p.shape[0], per_row),
                                  stride=(per_row, 1))
    shape = list(p.shape)
    for dim, place in enumerate(p.placements):
        if place.is_shard():  # the first shard of a chunked dimension is the largest
            shape[place.dim] = -(-shape[place.dim] // mesh.size(dim))
    # one row per shard: the saved shape (shards, blocks) differs from any other sharding's, so
    # torch.distributed.checkpoint refuses to load it there instead of loading other blocks
    local = torch.zeros(1, reference.q8_num_blocks(math.prod(shape)), dtype=torch.float32, device=local_p.device)
    places = [Shard(0) if place.is_shard() else Replicate() for place in p.placements]
    return type(p).from_local(local, mesh, places, run_check=False)


def _local_blocks(absmax, numel):
    """The absmax of the local shard's blocks (a view: the kernel updates the state in place)."""
    return _dtensor.local(absmax).view(-1)[:reference.q8_num_blocks(numel)]


def _layout_tag(p):
    """Which blocks an 8-bit state of param p is made of (state key "absmax_layout", an int64
    tensor as every other state): [0], the blocks of the whole tensor (a plain param, or a
    DTensor whose shards are whole blocks: _row_blocks), or [1, mesh dims, mesh shape..., the
    tensor dim each mesh dim shards (-1: replicated)..., p's shape...] for per-shard blocks."""
    if not _dtensor.is_dtensor(p) or _row_blocks(p) is not None:
        return torch.zeros(1, dtype=torch.int64)
    mesh = p.device_mesh.shape
    dims = [place.dim if place.is_shard() else -1 for place in p.placements]
    return torch.tensor([1, len(mesh), *mesh, *dims, *p.shape], dtype=torch.int64)


def _describe_layout(tag):
    t = tag.tolist()
    if t == [0]:
        return "the whole tensor's blocks"
    n = t[1]
    return f"per-shard blocks of mesh {tuple(t[2:2 + n])} sharding dims {tuple(t[2 + n:2 + 2 * n])}"


def _check_loaded_absmax(sv, p, key):
    """A saved 8-bit state's absmax (sv[key]) must be made of the blocks this optimizer's kernel
    reads for p: its codes are relative to them."""
    tag = _layout_tag(p)
    saved_tag = sv["absmax_layout"].detach().cpu() if "absmax_layout" in sv else torch.zeros(1, dtype=torch.int64)
    same = saved_tag.shape == tag.shape and torch.equal(saved_tag, tag)
    got, want = sv[key], _new_absmax(p)
    if same and not _dtensor.is_dtensor(p) and got.dim() == 2:  # gathered rows of FSDP2's
        inner = math.prod(p.shape[1:])
        if p.dim() >= 2 and inner % reference.Q8_BLOCK == 0 and \
                tuple(got.shape) == (p.shape[0], inner // reference.Q8_BLOCK):
            return
    elif same and tuple(got.shape) == tuple(want.shape) and (not _dtensor.is_dtensor(want) or (
            _dtensor.is_dtensor(got) and tuple(got.placements) == tuple(want.placements)
            and tuple(got.to_local().shape) == tuple(want.to_local().shape))):
        return
    what = f"shape {tuple(got.shape)}" + (f", local {tuple(got.to_local().shape)}" if _dtensor.is_dtensor(got) else "")
    need = f"shape {tuple(want.shape)}" + (f", local {tuple(want.to_local().shape)}" if _dtensor.is_dtensor(want)
                                          else "")
    raise ValueError(
        f"load_state_dict: {key!r} of a param of shape {tuple(p.shape)} holds {_describe_layout(saved_tag)} "
        f"({what}); this optimizer's 8-bit states of that param are made of {_describe_layout(tag)} ({need}). "
        "Blocks of a param sharded on dim 0 whose rows are a multiple of 256 elements load at any world size; "
        "per-shard blocks load into the sharding they were saved from only (to reshard them, checkpoint "
        "fusedtrain.optim.reshardable_state_dict(...) of the state dict, decoded to fp32 and quantized again on "
        "load, or keep such params, e.g. 1-D norms and biases, in a param group with state_format 'bf16' or 'fp32')")


def _quantize(x, key, device):
    """(codes, absmax) of a float state x for the 8-bit state `key` (reference.q8_encode), on device."""
    x = _dtensor.local(x).detach().to(device=device, dtype=torch.float32)
    return reference.q8_encode(x, signed=key == "exp_avg")


def _dequantize(codes, absmax, key):
    """The fp32 values of an 8-bit state; a DTensor's decoded shard by shard with its blocks."""
    signed = key == "exp_avg"
    if not _dtensor.is_dtensor(codes):
        return reference.q8_decode(codes, absmax.float().reshape(-1), signed=signed)
    local = _dtensor.local(codes)
    vals = reference.q8_decode(local, _local_blocks(absmax, local.numel()).float(), signed=signed)
    return type(codes).from_local(vals, codes.device_mesh, codes.placements, run_check=False, shape=codes.shape,
                                  stride=codes.stride())


def _decoded_8bit(st, k, caller):
    """A copy of param k's state st with its 8-bit moments decoded to fp32 (a DTensor's shard by
    shard, with its own blocks) and their absmax and layout keys dropped; and whether any
    moment was decoded."""
    new, decoded = {}, False
    for n, v in st.items():
        if n == "absmax_layout" or n in _ABSMAX_KEYS.values():
            continue
        if torch.is_tensor(v) and v.dtype == torch.uint8 and n in _ABSMAX_KEYS:
            tag = st.get("absmax_layout")
            if tag is not None and tag.tolist() != [0] and not _dtensor.is_dtensor(v):
                raise ValueError(f"{caller}: {n!r} of param {k} is made of {_describe_layout(tag)}, "
                                 "which a gathered state dict no longer tells apart: convert the sharded "
                                 "state dict (get_optimizer_state_dict's default) instead")
            v, decoded = _dequantize(v, st[_ABSMAX_KEYS[n]], n), True
        new[n] = v
    return new, decoded


def torch_state_dict(state_dict):
    """A copy of a fusedtrain optimizer's state_dict whose moments are fp32 (bf16 moments
    widened exactly, 8-bit ones decoded), fusedtrain-only keys dropped: what
    torch.optim.Adam/AdamW loads as its own (it would also load the bf16 moments as they are,
    casting them to the param dtype)."""
    out = {"state": {}, "param_groups": []}
    for k, st in state_dict["state"].items():
        new, _ = _decoded_8bit(st, k, "torch_state_dict")
        new.pop("master_param", None)
        out["state"][k] = {n: v.float() if n != "step" and torch.is_tensor(v) and v.dtype == torch.bfloat16 else v
                           for n, v in new.items()}
    for g in state_dict["param_groups"]:
        out["param_groups"].append({n: v for n, v in g.items() if n not in _GROUP_KEYS})
    return out


def reshardable_state_dict(state_dict):
    """A copy of a fusedtrain optimizer's (sharded) state_dict that torch.distributed.checkpoint
    can load at another sharding: 8-bit moments decoded to fp32 (4x the bytes), everything else
    as it is (master weights, bf16 moments, fusedtrain's group keys), and a marker "q8_decoded"
    on each decoded state. Save reshardable_state_dict(get_optimizer_state_dict(model, opt));
    at the new sharding, dcp.load into the new optimizer's own reshardable_state_dict(...) and
    set_optimizer_state_dict: load_state_dict quantizes each new shard with its own blocks. An
    ordinary checkpoint loaded into this form, or this form into an ordinary state dict, is a
    missing-key error from DCP (the marker, or the absmax), never codes cast to floats."""
    out = {"state": {}, "param_groups": [dict(g) for g in state_dict["param_groups"]]}
    for k, st in state_dict["state"].items():
        new, decoded = _decoded_8bit(st, k, "reshardable_state_dict")
        if decoded:
            new[_DECODED_KEY] = torch.tensor(1, dtype=torch.int64)
        out["state"][k] = new
    return out


class FusedAdam(torch.optim.Optimizer):
    """torch.optim.Adam with a fused step; same constructor checks, param_groups, state and
    state_dict (a checkpoint loads into torch.optim.Adam and back).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, capturable,
            decoupled_weight_decay: as torch.optim.Adam.
        foreach, fused: accepted and ignored (both True is torch's RuntimeError).
        differentiable: must be False (the update is a kernel outside autograd).
        master_weights: keep an fp32 copy of every fp16/bf16 param (state key
            "master_param") and fp32 moments; the update runs on the copy and the param
            receives its rounding.
        state_format: the moments' storage (also a param-group key): "fp32" (the default:
            the param dtype, or fp32 with master_weights, as before) or "bf16" (exp_avg,
            exp_avg_sq and max_exp_avg_sq in bf16, rounded once per step after fp32 math:
            4 bytes per parameter instead of 8) for params of at least 4096 elements
            (smaller ones keep the default), or "8bit": blockwise 8-bit moments, about 2.03
            bytes per parameter: uint8 codes under the usual keys and one fp32 absmax per
            block of 256 elements under "exp_avg_absmax", "exp_avg_sq_absmax" (and
            "max_exp_avg_sq_absmax"), decoded before and encoded after the fp32 math of every
            step (the map: csrc/include/fusedtrain/adam_math.h, q8_*; a torch checkpoint is
            quantized on load, torch_state_dict() decodes one for torch). Under FSDP2 the
            absmax of a param sharded on dim 0 with rows of a multiple of 256 elements is a
            (rows, blocks per row) DTensor that torch.distributed.checkpoint loads at any world
            size; other params' absmax is per shard and loads into the same sharding only
            ("absmax_layout", an int64 tensor, says which; load_state_dict checks it): to
            reshard those, checkpoint reshardable_state_dict(get_optimizer_state_dict(...))
            and load into the new optimizer's own reshardable_state_dict (decoded to fp32 on
            save, quantized again on load).
        stochastic_rounding: (also a param-group key) round each updated bf16 param up or
            down with probability proportional to the distance, instead of to the nearest:
            small updates then survive bf16 on average. For bf16 params without master
            weights. The random bits are a hash of (sr_seed, step, the param's position in its
            launch, the element's index): a run and its resume, and every DDP rank, round alike.
        sr_seed: the 32-bit seed of stochastic rounding (a param-group key, saved in the
            state_dict); default 0, the same on every rank (DDP replicas must round alike).
    """

    _step_supports_amp_scaling = True
    _step_supports_grad_mult = True  # fusedtrain.GradScaler hands grad_mult + found_inf to step()

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights=False, state_format="fp32", stochastic_rounding=False,
                 sr_seed=None):
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
                        decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
                        state_format=_check_state_format(state_format),
                        stochastic_rounding=bool(stochastic_rounding),
                        sr_seed=0 if sr_seed is None else sr_seed)
        super().__init__(params, defaults)
        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: its update is a "
                             "fused kernel outside autograd (use torch.optim.Adam(differentiable=True))")

    def add_param_group(self, param_group):
        # checked before torch appends the group: a refused group leaves nothing behind
        opt = {k: param_group.get(k, self.defaults.get(k)) for k in _GROUP_KEYS}
        _check_state_format(opt["state_format"])
        seed = opt["sr_seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFF:
            raise ValueError(f"sr_seed must be an int in [0, 2**32), got {seed!r}")
        if opt["stochastic_rounding"]:
            params = param_group["params"]
            if isinstance(params, torch.Tensor):
                params = [params]
            elif not isinstance(params, set):  # torch refuses sets itself
                params = list(params)
            bad = [p.dtype for p in params if p.dtype != torch.bfloat16]
            if bad or opt["master_weights"]:
                what = f"a param is {bad[0]}" if bad else "the group has master_weights=True"
                raise ValueError(f"stochastic_rounding=True is for bf16 params without master weights; {what}")
            param_group = {**param_group, "params": params}
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
            group.setdefault("state_format", self.defaults.get("state_format", "fp32"))
            group.setdefault("stochastic_rounding", self.defaults.get("stochastic_rounding", False))
            group.setdefault("sr_seed", self.defaults.get("sr_seed", 0))
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
        self.__dict__.pop("_plans", None)  # they hold the states being replaced
        # a checkpoint without fusedtrain's group keys (torch's, or torch_state_dict's) keeps
        # this optimizer's settings instead of falling back to the defaults
        state_dict = {**state_dict, "param_groups": [
            {**{k: mine[k] for k in _GROUP_KEYS if k in mine and k not in saved}, **saved}
            for saved, mine in zip(state_dict["param_groups"], self.param_groups)]}
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        # the saved 8-bit blocks must be this optimizer's (checked before anything changes)
        for saved, mine in zip(saved_groups, self.param_groups):
            for sid, p in zip(saved["params"], mine["params"]):
                sv = saved_state.get(sid, {})
                for k, ak in _ABSMAX_KEYS.items():  # 8-bit saved: kept as codes or decoded, by its blocks
                    if k in sv and torch.is_tensor(sv[k]) and sv[k].dtype == torch.uint8:
                        if _DECODED_KEY in sv:  # codes cast into a decoded template would be floats
                            raise ValueError(f"load_state_dict: {k!r} of a param marked {_DECODED_KEY!r} "
                                             "(reshardable_state_dict) holds 8-bit codes")
                        if ak not in sv:
                            raise ValueError(f"load_state_dict: the 8-bit {k!r} of a param has no {ak!r}")
                        _check_loaded_absmax(sv, p, ak)
        super().load_state_dict(state_dict)
        # torch casts every state to the param dtype; master-weight groups keep fp32 states
        # (and their fp32 master copies) from the saved dict, lean formats their own dtype.
        saved_ids = [i for g in saved_groups for i in g["params"]]
        ours = [(p, g) for g in self.param_groups for p in g["params"]]
        for sid, (p, group) in zip(saved_ids, ours):
            st = self.state.get(p)
            if not st:
                continue
            sv = saved_state.get(sid, {})
            sdtype = self._state_dtype(group, p)
            st.pop("absmax_layout", None)
            st.pop(_DECODED_KEY, None)
            if sdtype == torch.uint8:  # 8-bit: saved codes as they are, other states quantized
                st["absmax_layout"] = _layout_tag(p)
                for k, ak in _ABSMAX_KEYS.items():
                    if k not in sv:
                        st.pop(ak, None)
                    elif sv[k].dtype == torch.uint8 and ak in sv:
                        st[k] = sv[k].detach().to(device=p.device, copy=True)
                        st[ak] = sv[ak].detach().to(device=p.device, dtype=torch.float32, copy=True)
                        if not _dtensor.is_dtensor(p):  # a full (gathered) state dict of FSDP2's rows
                            st[ak] = st[ak].reshape(-1)
                    else:
                        codes, absmax = _quantize(sv[k], k, p.device)  # of the local shard
                        if _dtensor.is_dtensor(p):
                            st[ak] = _new_absmax(p)
                            _dtensor.local(st[ak]).view(-1)[:absmax.numel()].copy_(absmax)
                            st[k] = type(p).from_local(codes, p.device_mesh, p.placements, run_check=False,
                                                       shape=p.shape, stride=p.stride())
                        else:
                            st[k], st[ak] = codes, absmax
            else:  # from the saved values (a torch checkpoint's fp32 is rounded once, an 8-bit one decoded)
                for k, ak in _ABSMAX_KEYS.items():
                    st.pop(ak, None)
                    if k not in sv:
                        continue
                    if sv[k].dtype == torch.uint8 and ak in sv:
                        st[k] = _dequantize(sv[k], sv[ak], k).to(device=p.device, dtype=sdtype)
                    elif sdtype != p.dtype:
                        st[k] = sv[k].detach().to(device=p.device, dtype=sdtype, copy=True)
            if self._uses_master(group, p):
                if "master_param" in sv:
                    st["master_param"] = sv["master_param"].detach().to(device=p.device, dtype=torch.float32,
                                                                          copy=True)
                else:
                    st["master_param"] = p.detach().float().clone()
            else:
                st.pop("master_param", None)

    @staticmethod
    def _uses_master(group, p):
        return bool(group.get("master_weights")) and p.dtype in _LOW

    @classmethod
    def _state_dtype(cls, group, p):
        """The moments' dtype of param p: the lean format's, fp32 with master weights, else p's."""
        lean = _lean_dtype(group, p)
        return lean if lean is not None else torch.float32 if cls._uses_master(group, p) else p.dtype

    def _init_state(self, group, p):
        state = self.state[p]
        master = self._uses_master(group, p)
        sdtype = self._state_dtype(group, p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        # 8-bit codes are read as a flat array: contiguous (their absmax: per local shard)
        fmt = torch.contiguous_format if sdtype == torch.uint8 else torch.preserve_format
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        for k in keys:
            state[k] = torch.zeros_like(p, dtype=sdtype, memory_format=fmt)
            if sdtype == torch.uint8:
                state[_ABSMAX_KEYS[k]] = _new_absmax(p)
        if sdtype == torch.uint8:
            state["absmax_layout"] = _layout_tag(p)
        if master:
            state["master_param"] = p.detach().float().clone(memory_format=torch.preserve_format)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
                    exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax, created):
        """Append the group's params that have a grad, their grads and their states to the
        lists, as torch.optim.Adam's _init_group does, creating the states of a param's first
        step (those params are appended to `created`); DTensor params (FSDP2) give their local
        shards. master_params gets one entry per param, None where the param keeps no fp32
        copy (fusedtrain/ops/adam.py drops them per (device, dtype) call); the absmax lists
        likewise, one entry per param with 8-bit states (state_format="8bit"). A sparse grad raises
        before any state exists for its param. Written with map() over the lists: at 1000
        params this is most of the step's host time."""
        ps = group["params"]
        gs = [p.grad for p in ps]
        if not all(map(operator.is_not, gs, itertools.repeat(None))):
            ps = [p for p, g in zip(ps, gs) if g is not None]
            gs = [g for g in gs if g is not None]
        if not ps:
            return
        sts = list(map(self.state.__getitem__, ps))  # a new param gets an empty dict
        if not all(sts):
            for p, g, st in zip(ps, gs, sts):
                if not st:
                    if g.layout != torch.strided:
                        raise RuntimeError("fusedtrain adam: Adam does not support sparse gradients, please "
                                           f"consider SparseAdam instead (a param has a {g.layout} grad)")
                    self._init_state(group, p)
                    created.append(p)
        params += ps
        grads += gs
        exp_avgs += map(_EXP_AVG, sts)
        exp_avg_sqs += map(_EXP_AVG_SQ, sts)
        if group["amsgrad"]:
            max_exp_avg_sqs += map(_MAX_EXP_AVG_SQ, sts)
        steps += map(_STEP, sts)
        if group.get("master_weights"):
            master_params += map(dict.get, sts, itertools.repeat("master_param"))
        # 8-bit states carry their absmax whatever the group's state_format says now (a later
        # change converts no state): the plans (csrc/adam_plan.cpp) read them so too
        if group.get("state_format") == "8bit" or any(map(operator.contains, sts, itertools.repeat("exp_avg_absmax"))):
            exp_avg_absmax += map(dict.get, sts, itertools.repeat("exp_avg_absmax"))
            exp_avg_sq_absmax += map(dict.get, sts, itertools.repeat("exp_avg_sq_absmax"))
            if group["amsgrad"]:
                max_exp_avg_sq_absmax += map(dict.get, sts, itertools.repeat("max_exp_avg_sq_absmax"))
        if _dtensor.any_dtensor(ps):
            for lst in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params):
                lst[:] = map(_dtensor.local, lst)
            for lst in (exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax):
                lst[:] = [a if a is None else _local_blocks(a, p.numel()) for a, p in zip(lst, params)]

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step, unscaling the gradients as they are read when a GradScaler
        set `grad_scale` (torch's) or `grad_mult` (fusedtrain's), and skipped on the device
        when it set a nonzero `found_inf`.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_mult = getattr(self, "grad_mult", None)
        grad_scale = getattr(self, "grad_scale", None)
        if grad_mult is None and grad_scale is not None:
            grad_mult = (torch.reciprocal(grad_scale.to(torch.float32)) if torch.is_tensor(grad_scale)
                         else torch.tensor(1.0 / float(grad_scale), dtype=torch.float32))
        self._step_scaled(grad_mult=grad_mult, found_inf=getattr(self, "found_inf", None))
        return loss

    @torch.no_grad()
    def _step_scaled(self, grad_mult=None, found_inf=None):
        """The step with every gradient multiplied by `grad_mult` as it is read and nothing
        written when `found_inf` is nonzero (optional one-element fp32 tensors, any device).
        A bad input raises before any tensor is written, and removes the states this step
        created."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or \
            self._cuda_graph_capture_health_check  # the older name (torch < 2.11)
        check()
        tracing = adam_ops._tracing()
        # param group index -> GroupPlan (docs/design.md §7); a subclass's own _init_group is
        # what its steps must run, so it gets none
        plans = {} if tracing or type(self)._init_group is not FusedAdam._init_group else \
            self.__dict__.setdefault("_plans", {})
        calls, planned, created, kept = [], [], [], {}
        try:
            for i, group in enumerate(self.param_groups):
                hyper = self._hyper(group, i)
                plan = plans.pop(i, None)
                if plan is not None and not adam_ops.gather(plan, group, self.state, hyper):
                    plan = None  # its states may be garbage by now
                if plan is None:
                    lists = adam_ops.AdamTensors(*([] for _ in adam_ops.AdamTensors._fields))
                    self._init_group(group, *lists, created)
                    group_calls = adam_ops.prepare(lists, hyper, grad_mult, found_inf)
                    plan = None if tracing else adam_ops.plan_group(group, self.state, group_calls)
                    if plan is None:
                        calls += group_calls
                        continue
                kept[i] = plan
                planned.append((plan, hyper, adam_ops.plan_scalars(plan, hyper, grad_mult, found_inf)))
            adam_ops.check_calls(calls)
            if calls:  # the op checks the first call's lists before it writes, check_calls() the others
                adam_ops.launch(calls[0])
        except BaseException:
            for p in created:
                self.state.pop(p, None)
            for plan, *_ in planned:
                plan.plan.release()
            plans.clear()  # none of them holds what was removed
            raise
        try:
            for c in calls[1:]:
                adam_ops.launch(c)
            for plan, hyper, scalars in planned:
                adam_ops.launch_plan(plan, hyper, scalars)
        except BaseException:
            for plan, *_ in planned:
                plan.plan.release()
            plans.clear()
            raise
        plans.clear()  # a group removed since the last step keeps none
        plans.update(kept)

    @staticmethod
    def _hyper(group, index):
        beta1, beta2 = group["betas"]
        sr_params = bool(group.get("stochastic_rounding"))
        # a bf16 exp_avg_sq is rounded stochastically: the lean format's, and bf16 params' own
        # (with stochastic_rounding; rounded to nearest it would not decay)
        sr_exp_avg_sq = group.get("state_format") == "bf16" or sr_params
        return adam_ops.AdamHyper(
            group["lr"] if torch.is_tensor(group["lr"]) else float(group["lr"]), _scalar(beta1), _scalar(beta2),
            float(group["eps"]), float(group["weight_decay"]), bool(group["amsgrad"]), bool(group["maximize"]),
            bool(group["decoupled_weight_decay"]),
            reference.sr_group_seed(int(group.get("sr_seed", 0)), index) if sr_params or sr_exp_avg_sq else 0,
            sr_params, sr_exp_avg_sq)


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW with a fused step (decoupled weight decay, default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False, state_format="fp32", stochastic_rounding=False, sr_seed=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights, state_format=state_format,
                         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

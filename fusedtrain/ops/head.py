"""The many-label head: linear + BCE with logits without the B x L logits (docs/design.md §2,
"the head").

One opaque op, fusedtrain_head::linear_bce_with_logits, runs the whole head: labels (and rows,
when B is large) are cut into chunks; per chunk the logits z = h @ W_c.T are computed in the
compute dtype (the autocast dtype, else h's), turned in one fused pass into the loss and
d loss / d z (fp32 math, rounded once to the compute dtype), and that gradient feeds two matmuls
that accumulate grad_h and grad_W (and a column sum for grad_b) in fp32. The gradients are of
the loss *sum* with grad_output 1; the backward multiplies them by grad_output (times 1/N for
mean) in fp32 and rounds once to each input's dtype (docs/design.md §4), so a loss scale of 2^16
never meets an fp16 intermediate. Peak extra memory: one chunk, whatever L.

How a chunk's logits become (loss, gradient) is the backend's: native — a matmul (oneDNN on
CPU, cuBLAS on CUDA) then the epilogue op fusedtrain::linear_bce_epilogue_ in place; triton —
one kernel with the matmul and the epilogue (fusedtrain/triton/head.py); reference — torch ops
on the BCE formulas of fusedtrain/reference.py.
"""
import math

import torch

from fusedtrain import _backend, _dtensor, _ext, reference
from fusedtrain.ops import bce as _bce

OP = "linear_bce_with_logits"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the epilogues read
# Default elements of one chunk's logits: 4M (8 MiB in bf16) keeps every matmul of B = 1024 rows
# at 4096 labels, large enough for oneDNN/cuBLAS to run at full rate, and the chunk in cache-friendly
# reach of the epilogue that follows.
CHUNK_ELEMENTS = 1 << 22
_MIN_LABELS = 256
_MIN_ROWS = 64


def chunk_shape(B, L, chunk_size=None, budget=None):
    """(rows, labels) of a chunk: chunk_size labels (default: budget // B, at least 256), and as
    many rows as keep rows * labels within the budget (every row when B is not large)."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    labels = chunk_size if chunk_size is not None else max(_MIN_LABELS, budget // max(B, 1))
    labels = max(1, min(labels, L))
    # at least 64 rows: a chunk_size beyond the budget must not fall back to rank-1 products
    rows = max(1, min(B, max(_MIN_ROWS, budget // labels)))
    return rows, labels


# ---- one chunk, per backend: (loss sum as float64 0-d, d loss / d z in h's dtype or None) -------

def _reference_chunk(h, w, bias, target, pos_weight, label_weight, unknown, write_grad):
    op = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = (h @ w.T).to(op)
    if bias is not None:
        z = z + bias
    terms = reference.bce_terms(z, target.to(op), label_weight, pos_weight,
                                want=("loss", "dx") if write_grad else ("loss",))
    loss, dx = terms["loss"], terms.get("dx")
    if unknown is not None:
        loss = loss.masked_fill(unknown, 0.0)
        dx = None if dx is None else dx.masked_fill(unknown, 0.0)
    return loss.sum(dtype=torch.float64), None if dx is None else dx.to(h.dtype)


def _native_chunk(h, w, bias, target, pos_weight, label_weight, unknown, write_grad):
    z = h @ w.T
    row_loss = torch.ops.fusedtrain.linear_bce_epilogue_(z, bias, target, pos_weight, label_weight, unknown,
                                                         write_grad)
    return row_loss.sum(dtype=torch.float64), z if write_grad else None


def _triton_chunk(*args):
    from fusedtrain.triton import head as triton_head

    return triton_head.linear_bce_chunk(*args)


_CHUNK = {"reference": _reference_chunk, "native": _native_chunk, "triton": _triton_chunk}

if _ext._C is not None:
    @torch.library.register_fake("fusedtrain::linear_bce_epilogue_")
    def _(logits, bias, target, pos_weight, label_weight, unknown, write_grad):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)


def _mm_into(out, a, b, accumulate):
    """out (fp32/fp64) = or += a @ b, the product accumulated in out's dtype: fp32 operands
    straight into out; fp16/bf16 operands through cuBLAS's fp32 output on CUDA, or one rounding
    of the chunk's product to the compute dtype on CPU (oneDNN has no fp32 output in torch)."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    p = torch.mm(a, b, out_dtype=out.dtype) if a.is_cuda else torch.mm(a, b)
    if accumulate:
        out.add_(p)
    else:
        out.copy_(p)


class _SparseRows:
    """Sparse positives (CSR row offsets, label indices, optional values), sorted by label once,
    so each chunk's dense target is built from its own entries only."""

    def __init__(self, crow, col, values, B):
        counts = crow[1:] - crow[:-1]
        rows = torch.repeat_interleave(torch.arange(B, device=col.device), counts)
        order = torch.argsort(col, stable=True)
        self.cols, self.rows = col[order], rows[order]
        self.values = None if values is None else values[order].to(torch.float32)

    def bounds(self, edges):
        return torch.searchsorted(self.cols, torch.tensor(edges, device=self.cols.device)).tolist()

    def dense(self, lo, hi, r0, r1, l0, l1):
        y = torch.zeros((r1 - r0, l1 - l0), dtype=torch.float32, device=self.cols.device)
        rows, cols = self.rows[lo:hi], self.cols[lo:hi]
        keep = (rows >= r0) & (rows < r1)
        idx = (rows[keep] - r0, cols[keep] - l0)
        if self.values is None:  # positives: a repeated index is still one positive
            y[idx] = 1.0
        else:  # CSR values: repeated entries add up, as in to_dense()
            y.index_put_(idx, self.values[lo:hi][keep], accumulate=True)
        return y


# every element of grad_weight and grad_bias is written by its label chunk (tests poison them
# through this name)
_new_uninitialized = torch.empty


def _strided_ok(t, dtypes):
    return t.dtype in dtypes and (t.shape[1] <= 1 or t.stride(1) == 1)


def _run(h, weight, bias, target, crow, col, values, unknown, pos_weight, label_weight, compute_dtype, rows_per,
         labels_per, want_h, want_w, want_b, backend):
    B, H = h.shape
    L = weight.shape[0]
    dev = h.device
    op = torch.float64 if compute_dtype == torch.float64 else torch.float32
    chunk = _CHUNK[backend]
    kernels = backend != "reference"
    hc = h.to(compute_dtype).contiguous()
    gh = torch.zeros((B, H), dtype=op, device=dev) if want_h else h.new_empty((0,), dtype=op)
    gw = _new_uninitialized((L, H), dtype=op, device=dev) if want_w else h.new_empty((0,), dtype=op)
    gb = _new_uninitialized((L,), dtype=op, device=dev) if want_b else h.new_empty((0,), dtype=op)
    if want_w and B == 0:
        gw.zero_()
    if want_b and B == 0:
        gb.zero_()
    write = want_h or want_w or want_b
    vec = {k: (None if v is None else v.to(op).contiguous()) for k, v in
           (("bias", bias), ("pw", pos_weight), ("lw", label_weight))}
    sparse = _SparseRows(crow, col, values, B) if crow is not None else None
    edges = list(range(0, L, labels_per)) + [L]
    bounds = sparse.bounds(edges) if sparse is not None else None
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i, (l0, l1) in enumerate(zip(edges[:-1], edges[1:])):
        wc = weight[l0:l1].to(compute_dtype).contiguous()
        sl = {k: None if v is None else v[l0:l1] for k, v in vec.items()}
        for r0 in range(0, B, rows_per):
            r1 = min(B, r0 + rows_per)
            if sparse is not None:
                yc = sparse.dense(bounds[i], bounds[i + 1], r0, r1, l0, l1)
            else:
                yc = target[r0:r1, l0:l1]
                if kernels and not _strided_ok(yc, _TARGET_DTYPES):
                    yc = yc.to(torch.float32 if yc.dtype not in _TARGET_DTYPES else yc.dtype).contiguous()
            uc = None
            if unknown is not None:
                uc = unknown[r0:r1, l0:l1]
                if kernels and not _strided_ok(uc, (torch.bool,)):
                    uc = uc.contiguous()
            loss, g = chunk(hc[r0:r1], wc, sl["bias"], yc, sl["pw"], sl["lw"], uc, write)
            total += loss
            if g is None:
                continue
            first = r0 == 0
            if want_h:
                _mm_into(gh[r0:r1], g, wc, accumulate=True)
            if want_w:
                _mm_into(gw[l0:l1], g.T, hc[r0:r1], accumulate=not first)
            if want_b:
                s = g.sum(dim=0, dtype=op)
                if first:
                    gb[l0:l1] = s
                else:
                    gb[l0:l1] += s
    return total.to(op), gh, gw, gb


@torch.library.custom_op("fusedtrain_head::linear_bce_with_logits", mutates_args=())
def _head_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor | None,
             crow: torch.Tensor | None, col: torch.Tensor | None, values: torch.Tensor | None,
             unknown: torch.Tensor | None, pos_weight: torch.Tensor | None, label_weight: torch.Tensor | None,
             compute_dtype: torch.dtype, rows_per_chunk: int, labels_per_chunk: int, want_h: bool, want_w: bool,
             want_b: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, d sum / d h, d sum / d weight, d sum / d bias) in opmath (fp32; fp64 for fp64),
    each gradient an empty (0,) tensor unless wanted."""
    with torch.autocast(h.device.type, enabled=False):
        return _run(h, weight, bias, target, crow, col, values, unknown, pos_weight, label_weight, compute_dtype,
                    rows_per_chunk, labels_per_chunk, want_h, want_w, want_b, backend)


@_head_op.register_fake
def _(h, weight, bias, target, crow, col, values, unknown, pos_weight, label_weight, compute_dtype, rows_per_chunk,
      labels_per_chunk, want_h, want_w, want_b, backend):
    op = torch.float64 if compute_dtype == torch.float64 else torch.float32
    B, H = h.shape
    L = weight.shape[0]
    return (h.new_empty((), dtype=op), h.new_empty((B, H) if want_h else (0,), dtype=op),
            h.new_empty((L, H) if want_w else (0,), dtype=op), h.new_empty((L,) if want_b else (0,), dtype=op))


def _setup_context(ctx, inputs, output):
    is_tensor = [isinstance(t, torch.Tensor) for t in inputs]
    ctx.is_tensor, ctx.others = is_tensor, [None if t else v for t, v in zip(is_tensor, inputs)]
    ctx.save_for_backward(*(v for t, v in zip(is_tensor, inputs) if t))
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:3]]  # h, weight, bias
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zeros of W's size for the gradient outputs' gradients
    # the gradients are handed out once (scaled in place, then owned by autograd); a second
    # backward through the same graph computes them again
    ctx.grads = output[1:]


def _backward(ctx, grad_loss, *_):
    grads, ctx.grads = ctx.grads, None
    nones = (None,) * 14
    if grad_loss is None:
        return (None,) * 3 + nones
    if torch.is_grad_enabled():
        # the gradients are constants of the op: a gradient penalty through them would be
        # silently wrong
        raise NotImplementedError("linear_binary_cross_entropy_with_logits: backward(create_graph=True) (double "
                                  "backward) is not supported; use F.linear + FusedBCEWithLogits for that loss")
    if grads is None:
        saved = iter(ctx.saved_tensors)
        grads = _head_op(*(next(saved) if t else v for t, v in zip(ctx.is_tensor, ctx.others)))[1:]
    factor = grad_loss.to(grads[0].dtype)
    out = []
    for g, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad[:3]):
        if not needed:
            out.append(None)
            continue
        g = g.mul_(factor)  # in fp32, then rounded once to the input's dtype
        out.append(g if g.dtype == dtype else g.to(dtype))
    return (*out, *nones)


torch.library.register_autograd("fusedtrain_head::linear_bce_with_logits", _backward, setup_context=_setup_context)


# ---- validation and the public function -----------------------------------------------------

_FN = "linear_binary_cross_entropy_with_logits"


def _check_float(name, t, optional=False):
    _bce._check_tensor(_FN, name, t, optional)  # type and floating dtype, the BCE family's messages


def _check_vector(name, t, L, device):
    _check_float(name, t, optional=True)
    if t is None:
        return
    if t.shape != (L,):
        raise ValueError(f"{_FN}: {name} must have shape ({L},) (one value per label), got {tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"{_FN}: {name} is on {t.device} but h is on {device}; expected all tensors on one device")


def _check_no_grad(name, t):
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{_FN}: not differentiable with respect to {name}; it cannot have requires_grad=True")


def _sparse_target(target, B, L, device):
    """(crow, col, values) of sparse positives given as a sparse CSR (B, L) tensor or as a pair
    (row offsets, label indices)."""
    if isinstance(target, torch.Tensor):
        if target.shape != (B, L):
            raise ValueError(f"{_FN}: sparse target must have shape ({B}, {L}), got {tuple(target.shape)}")
        crow, col, values = target.crow_indices(), target.col_indices(), target.values()
        if values.is_complex() or not (values.is_floating_point() or values.dtype == torch.bool):
            raise TypeError(f"{_FN}: sparse target values must be real floating (or bool), got {values.dtype}")
        _check_no_grad("target", target)
    else:
        if not isinstance(target, (tuple, list)) or len(target) != 2 or \
                not all(isinstance(t, torch.Tensor) for t in target):
            raise TypeError(f"{_FN}: target must be a dense tensor, a sparse CSR tensor or a pair (row offsets, "
                            f"label indices) of tensors")
        crow, col = target
        values = None
    for name, t in (("row offsets", crow), ("label indices", col)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_FN}: sparse target {name} must be a 1-D int32/int64 tensor, got {t.dtype} of shape "
                            f"{tuple(t.shape)}")
        if t.device != device:
            raise RuntimeError(f"{_FN}: sparse target {name} is on {t.device} but h is on {device}")
    if crow.numel() != B + 1:
        raise ValueError(f"{_FN}: sparse target row offsets must have B + 1 = {B + 1} entries, got {crow.numel()}")
    crow, col = crow.to(torch.int64), col.to(torch.int64)
    if col.numel():
        lo, hi = int(col.min()), int(col.max())
        if lo < 0 or hi >= L:
            raise ValueError(f"{_FN}: sparse target label indices must be in [0, {L}), got values in [{lo}, {hi}]")
    if int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"{_FN}: sparse target row offsets must start at 0, never decrease and end at the number "
                         f"of label indices ({col.numel()})")
    return crow, col, values


def linear_binary_cross_entropy_with_logits(h, weight, bias, target, *, pos_weight=None, label_weight=None,
                                            reduction="mean", unknown_mask=None, chunk_size=None):
    """BCE with logits of the linear head h @ weight.T + bias against target, without
    materializing the logits: the value of
    FusedBCEWithLogits(reduction=reduction, pos_weight=pos_weight, weight=label_weight)(F.linear(h, weight, bias), target).

    Args:
        h: (..., H) features (an autocast region casts them, as F.linear would).
        weight: (L, H); bias: (L,) or None.
        target: dense (..., L) floating targets (soft labels allowed); or sparse positives for a
            2-D h: a torch.sparse_csr (B, L) tensor (its values are the targets; every other
            element is 0) or a pair (row offsets (B + 1,), label indices) of int tensors.
        pos_weight, label_weight: (L,) or None: BCE's pos_weight and a per-label weight.
        reduction: "mean" (over the known elements) or "sum"; "none" is refused: it would
            materialize the B x L losses this function exists to avoid.
        unknown_mask: bool, target's dense shape: True marks an unknown label, left out of the
            loss and of the mean's denominator.
        chunk_size: labels per chunk (default: chosen from a budget of 4M logits per chunk).
    """
    _check_float("h", h)
    _check_float("weight", weight)
    _check_float("bias", bias, optional=True)
    if reduction == "none":
        raise ValueError(f"{_FN}: reduction='none' would materialize the B x L losses; use "
                         f"fusedtrain.FusedBCEWithLogits(reduction='none') on the logits instead")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{_FN}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2:
        raise ValueError(f"{_FN}: weight must be 2-D (num_labels, in_features), got shape {tuple(weight.shape)}")
    L, H = weight.shape
    if h.dim() < 1 or h.shape[-1] != H:
        raise ValueError(f"{_FN}: h must have {H} features in its last dimension (weight is {L} x {H}), got shape "
                         f"{tuple(h.shape)}")
    for name, t in (("h", h), ("weight", weight), ("bias", bias)):
        if _dtensor.is_dtensor(t):
            raise TypeError(f"{_FN}: {name} is a DTensor (a sharded parameter); call the head through its module "
                            f"under fully_shard (FSDP2 gathers the weight for the forward), or pass full tensors")
    device = h.device
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != device:
            raise RuntimeError(f"{_FN}: {name} is on {t.device} but h is on {device}; expected all tensors on one "
                               f"device")
    if bias is not None and bias.shape != (L,):
        raise ValueError(f"{_FN}: bias must have shape ({L},), got {tuple(bias.shape)}")
    _check_vector("pos_weight", pos_weight, L, device)
    _check_vector("label_weight", label_weight, L, device)
    _check_no_grad("pos_weight", pos_weight)
    _check_no_grad("label_weight", label_weight)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_FN}: chunk_size must be a positive int (labels per chunk) or None, got {chunk_size!r}")

    autocast = torch.is_autocast_enabled(device.type) and h.dtype != torch.float64
    if autocast:
        compute_dtype = torch.get_autocast_dtype(device.type)
    else:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != h.dtype:
                raise RuntimeError(f"{_FN}: h ({h.dtype}) and {name} ({t.dtype}) must have the same dtype outside "
                                   f"autocast, as in F.linear")
        compute_dtype = h.dtype
    out_dtype = torch.float32 if autocast else compute_dtype

    lead = h.shape[:-1]
    B = math.prod(lead)
    h2 = h.reshape(B, H)
    crow = col = values = dense = None
    dense_shape = (*lead, L)
    if isinstance(target, torch.Tensor) and target.layout == torch.strided:
        _check_float("target", target)
        if target.shape != dense_shape:
            raise ValueError(f"{_FN}: target must have shape {dense_shape} (h's leading dimensions by num_labels), "
                             f"got {tuple(target.shape)}")
        if target.device != device:
            raise RuntimeError(f"{_FN}: target is on {target.device} but h is on {device}")
        _check_no_grad("target", target)
        dense = target.reshape(B, L)
    else:
        if isinstance(target, torch.Tensor) and target.layout != torch.sparse_csr:
            raise TypeError(f"{_FN}: a sparse target must be a torch.sparse_csr tensor, got layout {target.layout}")
        if h.dim() != 2:
            raise ValueError(f"{_FN}: sparse targets need a 2-D h (B, H), got shape {tuple(h.shape)}")
        crow, col, values = _sparse_target(target, B, L, device)
    unknown = None
    if unknown_mask is not None:
        if not isinstance(unknown_mask, torch.Tensor) or unknown_mask.dtype != torch.bool:
            raise TypeError(f"{_FN}: unknown_mask must be a bool tensor, got "
                            f"{getattr(unknown_mask, 'dtype', type(unknown_mask).__name__)}")
        if unknown_mask.shape != dense_shape:
            raise ValueError(f"{_FN}: unknown_mask must have the target's shape {dense_shape}, got "
                             f"{tuple(unknown_mask.shape)}")
        if unknown_mask.device != device:
            raise RuntimeError(f"{_FN}: unknown_mask is on {unknown_mask.device} but h is on {device}")
        unknown = unknown_mask.reshape(B, L)

    backend = _backend.select(device, OP, compute_dtype, KERNEL_DTYPES)
    rows_per, labels_per = chunk_shape(B, L, chunk_size)
    grad_on = torch.is_grad_enabled()
    want = [grad_on and t is not None and t.requires_grad for t in (h, weight, bias)]
    total, *_ = _head_op(h2, weight, bias, dense, crow, col, values, unknown, pos_weight, label_weight, compute_dtype,
                         rows_per, labels_per, *want, backend)
    if reduction == "mean":
        # over the known elements; all unknown gives 0 with zero gradients, not NaN (as ignore_index)
        count = B * L if unknown is None else (B * L - unknown.sum()).clamp_min(1)
        total = total / count
    return total.to(out_dtype)

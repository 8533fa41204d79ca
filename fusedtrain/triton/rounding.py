"""The one store of every Triton kernel: an fp32 value rounded once to the storage dtype.

bf16 is rounded to nearest even with integer ops, what `cvt.rn.bf16.f32` does on the GPU and
c10::BFloat16 does in torch (NaN becomes torch's 0x7FC0): the interpreter's own float cast
truncates, and the interpreter must execute the bits the GPU produces. fp16/fp32/fp64 use the
cast, which rounds to nearest even on both.
"""
import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, x, mask):
    if ptr.dtype.element_ty == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


AOT_HELPERS = ("store_rounded",)

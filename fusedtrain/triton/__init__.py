"""Triton kernels, one module per op family.

Each module lists its kernels for ahead-of-time compilation in AOT_SPECS (see
fusedtrain/triton/aot.py), so tests compile every kernel for sm_80 and sm_90 without a GPU.
"""

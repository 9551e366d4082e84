"""Triton kernels for the MoE hot path, each with a plain torch reference beside it.

Triton (the seam implementations): `route`, `permute`, `unpermute`, `grouped_swiglu`.
References (ground truth for tests): `route_ref`, `permute_ref`, `unpermute_ref`, `grouped_swiglu_ref`.
Faster torch paths (CPU strategy, same signatures): `grouped_swiglu_torch`, `permute_torch`,
`unpermute_torch`.
This package imports nothing of dsv3ray (bottom layer).

Without a GPU, compiled Triton cannot run at all, so importing this package on a CPU-only machine
turns on the Triton interpreter (TRITON_INTERPRET=1, read when the kernels are decorated) unless the
caller already chose; the Triton path then runs (slowly) on CPU, which is what the tests exercise.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ruff: noqa: E402  (the interpreter switch must precede the kernel definitions)

from kernels.grouped_mlp import grouped_swiglu
from kernels.permute import permute, unpermute
from kernels.reference import grouped_swiglu_ref, permute_ref, route_ref, unpermute_ref
from kernels.router import route
from kernels.torch_experts import grouped_swiglu_torch, permute_torch, unpermute_torch

__all__ = [
    "route",
    "permute",
    "unpermute",
    "grouped_swiglu",
    "route_ref",
    "permute_ref",
    "unpermute_ref",
    "grouped_swiglu_ref",
    "grouped_swiglu_torch",
    "permute_torch",
    "unpermute_torch",
]

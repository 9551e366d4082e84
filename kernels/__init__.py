"""Triton kernels for the MoE hot path, each with a plain torch reference beside it.

Triton (the seam implementations): `route`, `permute`, `unpermute`, `grouped_swiglu`.
References (ground truth for tests): `route_ref`, `permute_ref`, `unpermute_ref`, `grouped_swiglu_ref`.
Fast torch expert path (CPU): `grouped_swiglu_torch`.
This package imports nothing of dsv3ray (bottom layer).
"""

from kernels.grouped_mlp import grouped_swiglu
from kernels.permute import permute, unpermute
from kernels.reference import grouped_swiglu_ref, permute_ref, route_ref, unpermute_ref
from kernels.router import route

__all__ = [
    "route",
    "permute",
    "unpermute",
    "grouped_swiglu",
    "route_ref",
    "permute_ref",
    "unpermute_ref",
    "grouped_swiglu_ref",
]

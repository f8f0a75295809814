"""Exact float32 distances from 16-bit keys in one GEMM (the GPU path of torch exact search).

The float32 queries are split into P 16-bit parts (float16: 2, bfloat16: 3) whose sum equals
them to ~2^-22 relative, and each key's float32 squared norm likewise. One GEMM with float32
accumulation and output then gives the final L2 distance less |q|^2 (which does not change a
query's ranking) for every (query, key):

    [-2 q_1, ..., -2 q_P, c, ..., c] . [k, ..., k, |k|^2_1 / c, ..., |k|^2_P / c]^T
        = |k|^2 - 2 q.k

Every product of two 16-bit values is exact in float32, and scaling by -2 or a power of two c
is exact, so the result matches a float32 product to ~2^-22 while the keys are read in 16 bits
and the scores are written once (the split product formerly wrote (P B, C) scores, summed them
and added the norms: ~5 passes over the scores). c keeps float16 norms in range (|k|^2 / c <=
2^14); bfloat16 has float32's range (c = 1). For the inner product: [-q_1, ..., -q_P] .
[k, ..., k]^T = -q.k. The inner dimension is padded with zeros to a multiple of 8 (tensor
cores).
"""

from __future__ import annotations

import math

import torch

FP16_NORM_ROOM = 2.0**14  # largest |k|^2 / c kept in float16 (its max is 65504)
FP16_MAX_SCALE = 2.0**15  # c itself must be a float16


def n_parts(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float16 else 3


def split16(x: torch.Tensor, dtype: torch.dtype, parts: int) -> list[torch.Tensor]:
    """float32 ``x`` as ``parts`` 16-bit tensors whose float32 sum is x to ~2^-22 relative."""
    out, rest = [], x.float()
    for _ in range(parts):
        p = rest.to(dtype)
        out.append(p)
        rest = rest - p.float()
    return out


def query_parts(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 queries as a sum of 16-bit parts stacked (P * B, d), exact to ~2^-22."""
    return torch.cat(split16(q, dtype, n_parts(dtype)), 0)


def norm_scale(norms: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The power of two c dividing the squared norms (float16: so they stay in range), or None
    when no float16 c is large enough (then the float32 product is used)."""
    if dtype != torch.float16 or norms.numel() == 0:
        return 1.0
    top = max(float(norms.max()), 1.0)
    c = 2.0 ** max(0, math.ceil(math.log2(top / FP16_NORM_ROOM)))
    return c if c <= FP16_MAX_SCALE else None


def fused_width(dim: int, parts: int, metric: str) -> int:
    used = parts * dim + (parts if metric == "l2" else 0)
    return -(-used // 8) * 8


def fused_keys(
    keys: torch.Tensor, norms: torch.Tensor, dtype: torch.dtype, scale: float, metric: str,
    step: int = 1 << 18,
) -> torch.Tensor:  # fmt: skip
    """(N, W) 16-bit [k, ..., k, |k|^2_1 / c, ..., |k|^2_P / c, 0...] (inner product: no
    norms); its first d columns are the keys themselves."""
    n, d = keys.shape
    parts = n_parts(dtype)
    out = torch.zeros((n, fused_width(d, parts, metric)), dtype=dtype, device=keys.device)
    for s in range(0, n, step):  # bounded temporaries
        kb = keys[s : s + step].to(dtype)
        for p in range(parts):
            out[s : s + step, p * d : (p + 1) * d] = kb
        if metric == "l2":
            for p, part in enumerate(split16(norms[s : s + step] / scale, dtype, parts)):
                out[s : s + step, parts * d + p] = part
    return out


def fused_queries(
    q: torch.Tensor, dtype: torch.dtype, scale: float, metric: str, width: int
) -> torch.Tensor:
    """(B, W) 16-bit [-2 q_1, ..., -2 q_P, c, ..., c, 0...] (inner product: [-q_1, ...])."""
    b, d = q.shape
    parts = n_parts(dtype)
    out = torch.zeros((b, width), dtype=dtype, device=q.device)
    for p, part in enumerate(split16(q, dtype, parts)):
        out[:, p * d : (p + 1) * d] = part * (-2 if metric == "l2" else -1)
    if metric == "l2":
        out[:, parts * d : parts * d + parts] = scale
    return out


def fused_scores(qf: torch.Tensor, kf: torch.Tensor, out_dtype_mm: bool) -> torch.Tensor:
    """(B, C) float32 ``qf @ kf^T``: 16-bit inputs, float32 accumulation and output."""
    if out_dtype_mm:
        return torch.mm(qf, kf.T, out_dtype=torch.float32)
    return qf.float() @ kf.float().T  # no 16-bit mm with a float32 output (the CPU, old torch)

"""RMS normalisation of a few rows on a CPU: one Numba pass instead of torch's seven operations.

Llama-style decoders normalise every layer's input twice and the last hidden state once
(61 calls a forward for SmolLM2-135M). Each call is seven small torch operations (cast,
power, mean, add, reciprocal square root, two products), each a few microseconds of dispatch
and a wake-up of torch's thread pool between ``decode.skinny``'s kernel calls. One pass per
row does the same arithmetic: on a 2-core Zen 5 VM a tree forward at a 1024-token context
took 2-8% less time with it (README, issue 10).

A module is served only where its own output on a probe input matches this pass (checked
once per module and weight), so a norm with other arithmetic, such as Gemma's ``1 + weight``,
keeps its forward. The sum of squares runs in another order, so results agree with torch's
to float32 rounding.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import numba
import numpy as np
import torch

from retrodraft.decode.skinny import MAX_ROWS, KernelSettings, weight_stamp

# fast math without "no infinities, no NaNs": an overflowing input stays inf, as in torch
FAST = {"contract", "reassoc", "nsz", "arcp"}
PROBE_ROWS = 3
TOLERANCE = 1e-5  # relative, on the probe: float32 rounding passes, other arithmetic does not


@numba.njit(cache=True, fastmath=FAST, nogil=True)
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32, out: np.ndarray) -> None:
    """out[i] = weight * (x[i] / sqrt(mean(x[i] ** 2) + eps)) for float32 x, out [rows, d]."""
    rows, d = x.shape
    for i in range(rows):
        total = np.float32(0.0)
        for j in range(d):
            total += x[i, j] * x[i, j]
        scale = np.float32(1.0) / np.sqrt(total / np.float32(d) + eps)
        for j in range(d):
            out[i, j] = weight[j] * (x[i, j] * scale)


def epsilon(module: torch.nn.Module) -> float | None:
    """A norm module's epsilon (``variance_epsilon``, as Llama's, or ``eps``), None if it has none."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def rms_rows(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """``rms_norm`` over the last dimension of C-contiguous float32 ``x`` [..., d], into a new array."""
    out = np.empty_like(x)
    d = x.shape[-1]
    rms_norm(x.reshape(-1, d), weight, eps, out.reshape(-1, d))
    return out


def normalise(x: torch.Tensor, weight: np.ndarray, eps: np.float32) -> torch.Tensor:
    """``rms_rows`` of float32 CPU ``x`` [..., d]."""
    return torch.from_numpy(rms_rows((x if x.is_contiguous() else x.contiguous()).numpy(), weight, eps))


_verdicts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> (weight's stamp, served?)


def serves(module: torch.nn.Module) -> bool:
    """Whether ``normalise`` computes ``module``'s forward: a module with a float32 CPU
    weight [d] and an epsilon (``variance_epsilon`` or ``eps``) whose own output on a probe
    input agrees with it. Decided once per module and weight (made again after a load or an
    optimizer step)."""
    weight = getattr(module, "weight", None)
    eps = epsilon(module)
    if (not isinstance(weight, torch.Tensor) or weight.ndim != 1 or weight.dtype != torch.float32
            or weight.device.type != "cpu" or eps is None or "RMSNorm" not in type(module).__name__):
        return False
    stamp = weight_stamp(weight)
    held = _verdicts.get(module)
    if held is None or held[0] != stamp:
        probe = torch.randn(PROBE_ROWS, weight.shape[0], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = module(probe)
        ours = normalise(probe, weight.detach().numpy(), np.float32(eps))
        ok = (isinstance(expected, torch.Tensor) and expected.shape == ours.shape
              and bool(torch.allclose(expected, ours, rtol=TOLERANCE, atol=TOLERANCE)))
        held = _verdicts[module] = (stamp, ok)
    return held[1]


@contextlib.contextmanager
def rms_norms(model: torch.nn.Module, settings: KernelSettings) -> Iterator[None]:
    """Within the block, where ``settings`` are active (float32 on a CPU), the model's RMS
    norms (``serves``) compute inputs of at most MAX_ROWS rows without grad with
    ``normalise``; other inputs take the module's own forward. Modules already patched (an
    enclosing block) are left to that block."""
    patched = [m for m in model.modules() if "forward" not in vars(m) and serves(m)] if settings.active else []
    for module in patched:
        weight, eps = module.weight.detach().numpy(), np.float32(epsilon(module))
        own = module.forward

        def forward(x: torch.Tensor, own=own, weight=weight, eps=eps) -> torch.Tensor:
            if (x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad or x.ndim == 0
                    or x.shape[-1] != weight.shape[0] or x.numel() > MAX_ROWS * weight.shape[0]):
                return own(x)
            return normalise(x, weight, eps)

        module.forward = forward
    try:
        yield
    finally:
        for module in patched:
            del module.forward

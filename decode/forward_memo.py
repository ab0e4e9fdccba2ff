"""Values derived from a forward's inputs, made once per forward rather than once per layer.

transformers hands every layer of a forward the same mask and rotary-angle objects, so what
a layer derives from them (a tiled or transposed mask, angles as arrays) can be made by the
first layer and handed to the others.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def once_per_forward(memo: list, source, key, make: Callable[[], T]) -> T:
    """``make()``, derived from ``source``, again for the same object with the same ``key``
    and, for a tensor, the same version counter (inference tensors keep no version: the
    same object is trusted). ``memo`` is a one-element list whose element, the tuple
    (source, (key, version), answer), is replaced whole, so a thread running another
    model's forward meanwhile can make this one recompute but never hand it the other's
    answer; it holds the source, so that object's identity cannot pass to another."""
    version = source._version if isinstance(source, torch.Tensor) and not source.is_inference() else None
    stamp = (key, version)
    held = memo[0]
    if held is None or held[0] is not source or held[1] != stamp:
        held = memo[0] = (source, stamp, make())
    return held[2]

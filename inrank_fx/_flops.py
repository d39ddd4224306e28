"""One forward under torch.utils.flop_counter, shared by `tools.summary` and `tools.bench`."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def counted_forward(model: nn.Module, inputs: tuple) -> FlopCounterMode:
    """One forward under FlopCounterMode, without autograd where the model allows. The counter's
    module tracker hooks every module input and output that requires grad, and under no_grad a
    view of a parameter handed to a module (learned queries `self.query.expand(B, -1, -1)`)
    requires grad with no gradient function, which fails it ("Expected gradient function to be
    set"); such a model is counted in grad mode."""
    for grad in (False, True):
        counter = FlopCounterMode(display=False)
        try:
            with torch.set_grad_enabled(grad), counter:
                model(*inputs)
            return counter
        except AssertionError as err:
            if grad or "gradient function" not in str(err):
                raise
    raise AssertionError("unreachable")

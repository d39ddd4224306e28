"""Input capture: one run of the model on the example inputs records each module's first call,
for the torch.export frontend."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InRankError
from .torch_internals import tensor_versions
from .tracing import state_kept


def capture_calls(model: nn.Module, example_inputs,
                   original: nn.Module | None) -> dict[str, tuple[tuple, dict]]:
    """Run the model once on the example and record each module's first call (args, kwargs).

    The run leaves the model as it was: attributes its forwards set are put back, and tensors
    they write in place are copied back from `original` (the model as the user gave it; with
    None, transform(inplace=True), such a write is an error, as nothing holds the old values)."""
    versions = tensor_versions(_tensors(model))
    with state_kept(model):
        calls = _record_calls(model, example_inputs)
    after = tensor_versions(_tensors(model))
    written = [name for name, v in after.items() if v != versions.get(name)]
    if written and original is None:
        raise InRankError(f"transform(inplace=True, example_inputs=...): running the example "
                          f"wrote {', '.join(written)} in place, and nothing holds the values "
                          "before it; pass inplace=False (transform then works on a copy)")
    if written:
        before = dict(_tensors(original))
        with torch.no_grad():
            for name, t in _tensors(model):
                if name in written:
                    t.copy_(before[name])
    return calls

def _tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)

def _record_calls(model: nn.Module, example_inputs) -> dict[str, tuple[tuple, dict]]:
    calls: dict[str, tuple[tuple, dict]] = {}
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)

    def recorder(path):
        def hook(module, args, kwargs):
            calls.setdefault(path, (args, kwargs))
        return hook

    handles = [m.register_forward_pre_hook(recorder(p), with_kwargs=True)
               for p, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls

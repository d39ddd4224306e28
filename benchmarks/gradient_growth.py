"""Growth directions from the gradient (GradMax, Evci et al., ICLR 2022), a lever on InRank.

When the controller grows a layer, its new components start silent (U columns zero) with random
V columns, and learn through U's gradient G·V_new, where G = ∂L/∂W = Σ δᵀx is the gradient of
the layer's dense weight. A random V_new sees a random projection of G. GradMax starts the new
components where that gradient is largest: V_new along the top right singular vectors of G
(outside the span of the existing V, so they add directions), at the existing V's scale. The
function is unchanged (U_new stays zero); the new U columns start with the largest gradient a
silent component can have.

It needs G, which a factored layer never forms, so it is captured (a forward hook keeps the
input, a hook on the output's gradient adds δᵀx) only on the steps where the controller checks.
This module is the benchmark's: the library keeps it only if it wins (docs/RESULTS.md §3).
"""
from __future__ import annotations

import torch

import inrank_fx


class GradientGrowth:
    """Attach to a model after `inrank_fx.attach`: `arm(step)` before each optimizer step says
    whether to capture G on it, `after(step)` after it seeds the components a check added."""

    def __init__(self, model: torch.nn.Module, controller) -> None:
        self.controller = controller
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, inrank_fx.InRankLinear) and m.activation is None}
        self.widths = {n: m.width for n, m in self.layers.items()}
        self.capturing = False
        self.grads: dict[str, torch.Tensor] = {}
        self.seeded = 0  # components seeded from the gradient over the run
        for name, layer in self.layers.items():
            layer.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def forward_hook(layer, args, out):
            if not (self.capturing and torch.is_grad_enabled()):
                return
            x = args[0].detach().reshape(-1, layer.in_features)

            def on_grad(delta):
                g = delta.detach().reshape(-1, layer.out_features).T.float() @ x.float()
                self.grads[name] = self.grads.get(name, 0) + g
            out.register_hook(on_grad)
        return forward_hook

    def arm(self, next_step: int) -> None:
        """Capture G on the optimizer step `next_step` (1-based) when the controller checks
        after it."""
        cfg = self.controller.config
        self.capturing = (not self.controller.stopped and next_step >= cfg.warmup_steps
                          and next_step % cfg.check_every == 0)

    @torch.no_grad()
    def after(self) -> None:
        """Seed the columns each layer grew by at this step (the controller has run)."""
        if self.capturing and not self.controller.stopped:
            for name, layer in self.layers.items():
                old = self.widths[name]
                if layer.width > old and name in self.grads:
                    self._seed(layer, old, self.grads[name])
        self.widths = {n: m.width for n, m in self.layers.items()}
        self.capturing = False
        self.grads.clear()

    def _seed(self, layer, old: int, grad: torch.Tensor) -> None:
        v_old = layer.V[:, :old].float()
        q, _ = torch.linalg.qr(v_old)
        outside = grad - (grad @ q) @ q.T  # G restricted to directions V does not span yet
        new = layer.width - old
        _, _, vh = torch.linalg.svd(outside, full_matrices=False)
        scale = v_old.pow(2).mean().sqrt() * layer.in_features ** 0.5  # a column's norm
        layer.V[:, old:] = (vh[:new].T * scale).to(layer.V.dtype)
        self.seeded += new

"""`InRankExperts`: a stack of E matrices (mixture-of-experts weights, E × out × in) held as E
pairs of factors with one common, adapting width.

    W[e] ≈ U[e]·V[e]ᵀ        U: E × out × w,  V: E × in × w

Mixture-of-experts layers store their experts' weights stacked and run them with batched or
grouped matmuls (bmm, einsum, grouped mm, or a loop that indexes one expert at a time). The pass
puts this layer where the stacked parameter was. A read it recognises as a matmul against the
stack (`bmm(x, w.mT)`, `x @ w`, a two-operand einsum that is one of those, `F.linear(x, w[e])`)
becomes a call of the layer, two thin matmuls (`(x·V)·Uᵀ`: compute follows the rank); any other
read gets `.weight`, the stacked product (E × out × in, in the parameter's own layout), so every
kernel the model uses keeps working, and only the parameters (and optimizer state) follow the
rank there (`product_reads` says so, and the FLOP accounting follows it). Ranks are measured
per expert and applied per stack: the stack's rank is the largest any of its experts asks for,
so that no expert is cut below what its spectrum needs.
Everything else is `FactoredLayer`'s: silent buffer, W_0 for the update spectrum, growth,
truncation with the optimizer's column maps, the rank in checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InRankValueError
from .linear import INITS, FactoredLayer, _random_factors, _random_like, _svd_factors
from .spectrum import factor_singular_values, update_singular_values
from .torch_internals import initialised, tree_map

# What StackReads answers from the factors' metadata, without forming the product.
STACK_METADATA = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda",
                            "layout", "is_meta", "is_sparse", "is_quantized", "size", "dim",
                            "numel"})


class StackMetadata:
    """A stack's metadata (E × out × in) answered without forming it, as a tensor's: shape,
    size(), dim(), ndim, numel(), and dtype, device, requires_grad, is_cuda, layout, is_meta of
    its factors (every read `matchers.METADATA_ATTRS` lets through)."""

    shape: torch.Size

    def _a_factor(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self._a_factor().dtype

    @property
    def device(self) -> torch.device:
        return self._a_factor().device

    @property
    def requires_grad(self) -> bool:
        return self._a_factor().requires_grad

    @property
    def is_cuda(self) -> bool:
        return self._a_factor().is_cuda

    @property
    def ndim(self) -> int:
        return 3

    @property
    def layout(self) -> torch.layout:
        return self._a_factor().layout

    @property
    def is_meta(self) -> bool:
        return self._a_factor().is_meta

    is_sparse = False
    is_quantized = False

    def __getattr__(self, name: str):
        """Whatever else a tensor has (`w.transpose(1, 2)`, `w.mT`, `w.contiguous()`) is the
        stacked product's: code the pass never saw (a kernel a decorator dispatches to, as
        transformers' experts implementations) reads the stack as the parameter it was."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name not in _TENSOR_ATTRIBUTES \
                    or not initialised(self):
                raise
            return getattr(self.weight, name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """A torch function handed the stack itself (`torch.bmm(x, w)`, `x @ w`) gets its
        product."""
        args, kwargs = tree_map(_product, (tuple(args), kwargs or {}))
        return func(*args, **kwargs)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 3

    def numel(self) -> int:
        return self.shape.numel()


_TENSOR_ATTRIBUTES = frozenset(dir(torch.Tensor))


def _product(value):
    return value.weight if isinstance(value, StackMetadata) else value


class StackReads(StackMetadata):
    """How a factored stack reads as the stacked parameter it replaced (both InRankExperts and
    its frozen form): its call is a matmul against the stack as two thin ones, `.weight` is the
    product (E × out × in, differentiable), `layer[e]` is expert e's matrix formed alone (for a
    loop over experts that could not be rewritten, such as transformers' MixtralExperts), and
    the metadata reads are the stack's, answered without forming it."""

    U: torch.Tensor
    V: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        return self.U @ self.V.mT

    def forward(self, x: torch.Tensor, transposed: bool = True, expert=None) -> torch.Tensor:
        """A matmul against the stack as two thin ones: `x @ W.mT` (every expert on its own
        rows: E × T × in → E × T × out, as bmm against the transposed stack) or, with
        `transposed=False`, `x @ W` (x's last dimension is out); `expert=e` multiplies by
        expert e's matrix alone (`F.linear(x, w[e])`). Broadcasts as torch.matmul does."""
        u, v = (self.U, self.V) if expert is None else (self.U[expert], self.V[expert])
        if transposed:
            return torch.matmul(torch.matmul(x, v), u.mT)
        return torch.matmul(torch.matmul(x, u), v.mT)

    def __getitem__(self, index) -> torch.Tensor:
        return self.U[index] @ self.V[index].mT

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.U.shape[0], self.U.shape[1], self.V.shape[1]))

    def _a_factor(self) -> torch.Tensor:
        return self.U


class InRankExperts(StackReads, FactoredLayer):
    """E factored matrices of one shape (out × in each), at one rank and width."""

    def __init__(self, experts: int, in_features: int, out_features: int, rank: int, *,
                 buffer: int = 0, device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # FactoredLayer's constructor makes 2-D factors
        if min(experts, in_features, out_features) < 1:
            raise InRankValueError(f"InRankExperts needs positive sizes, got experts={experts}, "
                                   f"in={in_features}, out={out_features}")
        if rank < 1 or buffer < 0:
            raise InRankValueError(
                f"InRankExperts needs rank >= 1 and buffer >= 0, got {rank}, {buffer}"
            )
        self.activation = None
        # Set by the pass where the model reads the stack as its product (a read it could not
        # turn into a call of this layer): then the matmuls do dense work, whatever the rank.
        self.product_reads = False
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.rank = min(rank, self.full_rank)
        width = min(self.rank + buffer, self.full_rank)
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(experts, out_features, width, **factory))
        self.V = nn.Parameter(torch.empty(experts, in_features, width, **factory))
        self.register_parameter("bias", None)
        self.register_buffer("U0", torch.empty(experts, out_features, self.rank, **factory))
        self.register_buffer("V0", torch.empty(experts, in_features, self.rank, **factory))
        self.reset_parameters()

    @classmethod
    def from_stack(cls, stack: torch.Tensor, rank: int, *, buffer: int = 0, init: str = "svd",
                   name: str = "experts") -> "InRankExperts":
        """Factor a stacked E × out × in tensor expert by expert ("svd", "random", "iid" as
        `InRankLinear.from_weight`)."""
        if stack.dim() != 3:
            raise InRankValueError(f"{name}: expected a 3-D stack (experts x out x in), got shape "
                                   f"{tuple(stack.shape)}")
        experts, out_features, in_features = stack.shape
        layer = cls(experts, in_features, out_features, rank, buffer=buffer, device=stack.device,
                    dtype=stack.dtype)
        return layer._init_from(stack, None, init, name)

    @torch.no_grad()
    def _init_from(self, stack: torch.Tensor, bias, init: str, name: str) -> "InRankExperts":
        if init not in INITS:
            raise InRankValueError(f"{name}: init must be one of {INITS}, got {init!r}")
        if stack.is_meta:  # no values yet: inrank_fx.materialize initialises the layer later
            return self
        if init != "iid":
            make = _svd_factors if init == "svd" else _random_factors
            for e in range(self.experts):
                self.U[e], self.V[e] = make(stack[e], self.width, f"{name}[{e}]")
            self.U[..., self.rank:] = 0.0  # the buffer starts silent
        self.mark_reference()
        return self

    def reset_parameters(self) -> None:
        """i.i.d. factors with nn.Linear's default weight variance per expert; buffer silent."""
        std = (1.0 / (3.0 * self.in_features) / self.rank) ** 0.25
        with torch.no_grad():
            nn.init.normal_(self.U, 0.0, std)
            nn.init.normal_(self.V, 0.0, std)
            self.U[..., self.rank:] = 0.0
        self.mark_reference()

    @torch.no_grad()
    def mark_reference(self) -> None:
        used = self.U.any(dim=0).any(dim=0).nonzero() if not self.U.is_meta else None
        active = self.width if used is None else (int(used.max()) + 1 if used.numel() else 0)
        self.U0 = self.U[..., :active].detach().clone()
        self.V0 = self.V[..., :active].detach().clone()

    # -- the stack ---------------------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.U.shape[-1]

    def singular_values(self) -> torch.Tensor:
        """Per expert (E × width, descending), from QR of the factors and the small cores."""
        return factor_singular_values(self.U.detach(), self.V.detach())

    def update_singular_values(self) -> torch.Tensor:
        """Per expert, of the cumulative update U·Vᵀ − U0·V0ᵀ (E × up to full rank)."""
        s = update_singular_values(self.U.detach(), self.V.detach(), self.U0, self.V0)
        return s[:, : self.full_rank]

    # -- resizing ---------------------------------------------------------------------------

    @torch.no_grad()
    def grow(self, width: int, *, init: str = "zero", generator: torch.Generator | None = None) -> None:
        extra = width - self.width
        if extra < 0 or width > self.full_rank:
            raise InRankValueError(
                f"grow: width {width} must be in [{self.width}, {self.full_rank}]"
            )
        if init not in ("zero", "random"):
            raise InRankValueError(f"grow: init must be 'zero' or 'random', got {init!r}")
        if extra == 0:
            return
        new_v = _random_like(self.V, extra, generator)
        new_u = (self.U.new_zeros(self.experts, self.out_features, extra) if init == "zero"
                 else _random_like(self.U, extra, generator))
        self.U = nn.Parameter(torch.cat([self.U, new_u], dim=-1))
        self.V = nn.Parameter(torch.cat([self.V, new_v], dim=-1))

    @torch.no_grad()
    def truncate(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert keeps its `width` leading components (QR of the factors, SVD of the
        core, split as U√S, V√S); returns the per-expert column maps (E × w × width)."""
        if not 1 <= width <= self.width:
            raise InRankValueError(f"truncate: width {width} must be in [1, {self.width}]")
        dtype = self.U.dtype
        q_u, r_u = torch.linalg.qr(self.U.double())
        q_v, r_v = torch.linalg.qr(self.V.double())
        p, s, qh = torch.linalg.svd(r_u @ r_v.mT)
        root = s[:, :width].sqrt()
        left, right = p[..., :width] * root[:, None], qh[:, :width].mT * root[:, None]
        self.U = nn.Parameter((q_u @ left).to(dtype))
        self.V = nn.Parameter((q_v @ right).to(dtype))
        self.rank = min(self.rank, width)
        keep = s[:, :width] > s[:, :1] * 1e-12
        inv_root = torch.where(keep, 1 / root, torch.zeros_like(root))
        u_map = r_v.mT @ qh[:, :width].mT * inv_root[:, None]
        v_map = r_u.mT @ p[..., :width] * inv_root[:, None]
        return u_map.to(dtype), v_map.to(dtype)

    # -- accounting -------------------------------------------------------------------------

    def factored_params(self) -> int:
        return self.experts * self.width * (self.in_features + self.out_features)

    def dense_params(self) -> int:
        return self.experts * self.in_features * self.out_features

    def flops_per_row(self) -> int:
        """Per row through one expert: two thin matmuls, or, where the model reads the stack's
        product (`product_reads`), the dense work (only parameters follow the rank there)."""
        if self.product_reads:
            return self.dense_flops_per_row()
        return super().flops_per_row()

    def extra_repr(self) -> str:
        ratio = self.factored_params() / self.dense_params()
        reads = ", product_reads=True" if self.product_reads else ""
        return (f"experts={self.experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}, buffer={self.buffer}, "
                f"full_rank={self.full_rank}, params={ratio:.1%} of dense{reads}")


class FactoredExperts(StackReads, nn.Module):
    """A frozen stack of factored experts (what `freeze` makes of InRankExperts): U, V at the
    final rank, read as the stack (StackReads); no rank state."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor) -> None:
        super().__init__()
        self.U = nn.Parameter(U.detach().clone())
        self.V = nn.Parameter(V.detach().clone())

    def extra_repr(self) -> str:
        e, out_features, rank = self.U.shape
        return f"experts={e}, in_features={self.V.shape[1]}, out_features={out_features}, rank={rank}"


class ExpertList(StackMetadata, nn.ModuleList):
    """A stack of E matrices (E × out × in) held as E factored layers with ranks of their own:
    ranks applied per expert (`InRankConfig(expert_ranks="expert")`), where `InRankExperts`
    applies one rank per stack. Each expert is an `InRankLinear` (after `freeze`, a
    FactoredLinear or an nn.Linear), so the controller, optimizer state, checkpoints and
    `freeze` treat it as any linear layer; this list reads as the stack it replaced (`.weight`
    the E × out × in product, metadata from the experts) and its call runs the experts one
    after another at their own ranks (`forward` as StackReads.forward)."""

    product_reads = False  # set by the pass where the model reads the stack's product

    @classmethod
    def from_stack(cls, stack: torch.Tensor, rank: int, *, buffer: int = 0, init: str = "svd",
                   name: str = "experts") -> "ExpertList":
        if stack.dim() != 3:
            raise InRankValueError(f"{name}: expected a 3-D stack (experts x out x in), got shape "
                                   f"{tuple(stack.shape)}")
        if stack.is_meta:
            raise InRankValueError(
                f"{name}: expert_ranks='expert' needs the stack's values (a meta "
                "model: use expert_ranks='stack')"
            )
        from .linear import InRankLinear

        return cls(InRankLinear.from_weight(stack[e], None, rank, buffer=buffer, init=init,
                                            name=f"{name}[{e}]") for e in range(stack.shape[0]))

    @property
    def weight(self) -> torch.Tensor:
        return torch.stack([expert.weight for expert in self])

    def expert(self, index) -> nn.Module:
        """Expert `index`'s layer."""
        return nn.ModuleList.__getitem__(self, index)

    def forward(self, x: torch.Tensor, transposed: bool = True, expert=None) -> torch.Tensor:
        if expert is not None:
            return _times(self.expert(expert), x, transposed)
        experts = len(self)
        x = x.expand(*x.shape[:-3], experts, *x.shape[-2:]) if x.dim() >= 3 else \
            x.expand(experts, *x.shape)
        return torch.stack([_times(layer, x.select(-3, e), transposed)
                            for e, layer in enumerate(self)], dim=-3)

    @property
    def rank(self) -> int:
        """The largest expert's rank (what a per-stack rank would have to be)."""
        return max(expert.rank if hasattr(expert, "rank") else min(expert.weight.shape)
                   for expert in self)

    @property
    def width(self) -> int:
        return max(getattr(expert, "width", self.rank) for expert in self)

    @property
    def shape(self) -> torch.Size:
        first = self.expert(0)
        return torch.Size((len(self), first.out_features, first.in_features))

    def _a_factor(self) -> torch.Tensor:
        return next(self.parameters())


class IndexedExpertList(ExpertList):
    """An ExpertList read by indexing in a forward the pass could not rewrite (`self.w[e]` in a
    loop over the experts, as transformers' MixtralExperts): `[e]` is expert e's matrix, as the
    stack's was (`expert(e)` its layer)."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return super().__getitem__(index)
        return self.expert(index).weight


def _times(layer: nn.Module, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x @ Wᵀ (`transposed`, the layer's own call) or x @ W for one expert's layer, through its
    factors: an InRankLinear (U, V), a frozen FactoredLinear (up, down) or a merged nn.Linear."""
    if transposed:
        return layer(x)
    if hasattr(layer, "U"):
        return torch.matmul(torch.matmul(x, layer.U), layer.V.mT)
    if hasattr(layer, "up"):
        return torch.matmul(torch.matmul(x, layer.up.weight), layer.down.weight)
    return torch.matmul(x, layer.weight)


# The modules that take a stacked parameter's place: one rank per stack, or per expert.
FACTORED_STACKS = (InRankExperts, ExpertList)

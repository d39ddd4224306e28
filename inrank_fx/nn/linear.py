"""`InRankLinear`: a linear map held as two factors whose rank can change during training
(`FactoredLayer`: the factors and their rank, shared with InRankConv2d).

    y = (x · V[:, :w]) · U[:, :w]ᵀ + b          W ≈ U·Vᵀ,  U: out×w,  V: in×w

`rank` (r) is the rank the InRank rule has determined; `width` (w = r + buffer, capped at the full
rank) is how many components the layer computes with: the spare `buffer` components are where the
spectrum can show that the layer needs more rank. The forward is two plain matmuls, so
torch.compile, torch.export and ONNX see standard ops.

The buffer starts **silent**: its U columns are zero (its V columns are directions), so at
initialisation the layer is exactly rank r and the spectrum shows no random components that the
InRank rule could mistake for learned ones. The layer keeps its starting factors (U0, V0: only the
r active columns) as buffers, so the rule can measure the cumulative update W_t − W_0 from factors.

The factors hold exactly `width` columns, so parameter memory follows the rank. Only
`inrank_fx.set_ranks` changes a layer's width (through `grow` / `truncate` here, keeping the
optimizer in step); the rank travels in checkpoints as the module's extra state, and
`load_state_dict` takes the checkpoint's width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InRankValueError
from ..vocabulary import INITS
from .spectrum import factor_singular_values, update_singular_values

# Opt-in nonlinearity between the factors, x → σ(x·V) → ·Uᵀ (CoLA, Liu et al., EMNLP 2025): a
# different model, for training from scratch; never the dense function it was built from.
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class FactoredLayer(nn.Module):
    """Two factors U (out×w), V (in×w) whose rank can change during training: what InRankLinear
    and InRankConv2d share (rank, width, buffer, spectrum, growth, truncation, checkpoints).
    `isinstance(m, FactoredLayer)` finds every factored layer; `InRankLinear` is only the linear
    one. The forward here is the linear map; InRankConv2d runs the same factors as convolutions.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        buffer: int = 0,
        bias: bool = True,
        activation: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kind = type(self).__name__  # the messages name the layer's real kind (a conv, ...)
        if activation is not None and activation not in ACTIVATIONS:
            raise InRankValueError(f"{kind} activation must be one of {tuple(ACTIVATIONS)} or "
                                   f"None, got {activation!r}")
        self.activation = activation
        if in_features < 1 or out_features < 1:
            raise InRankValueError(
                f"{kind} needs positive sizes, got in={in_features}, out={out_features}"
            )
        if rank < 1:
            raise InRankValueError(f"{kind} rank must be >= 1, got {rank}")
        if buffer < 0:
            raise InRankValueError(f"{kind} buffer must be >= 0, got {buffer}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = min(rank, self.full_rank)
        width = min(self.rank + buffer, self.full_rank)
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, width, **factory))
        self.V = nn.Parameter(torch.empty(in_features, width, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        # W_0 = U0·V0ᵀ, the weight training started from (see `mark_reference`).
        self.register_buffer("U0", torch.empty(out_features, self.rank, **factory))
        self.register_buffer("V0", torch.empty(in_features, self.rank, **factory))
        self.reset_parameters()

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, *, buffer: int = 0, init: str = "svd", name: str = ""
    ) -> "InRankLinear":
        """Factor an nn.Linear by `init` (see `from_weight`); the bias is copied."""
        return cls.from_weight(
            linear.weight, linear.bias, rank, buffer=buffer, init=init, name=name or "linear"
        )

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rank: int,
        *,
        buffer: int = 0,
        init: str = "svd",
        name: str = "weight",
    ) -> "InRankLinear":
        """A layer computing x·weightᵀ (+ bias), weight: out×in, factored by `init`:

        - "svd": the rank-r truncated SVD of `weight`. On a freshly initialised model this is
          spectral initialisation (Khodak et al., ICLR 2021): the layer starts at the scale and
          in the leading directions of the model's own init (GPT-2's 0.02 and scaled residual
          projections survive). On a trained model it keeps the best rank-r approximation.
        - "random": random orthonormal directions carrying the top-r singular values of
          `weight`: the model's own scale, none of its directions.
        - "iid": i.i.d. factors with nn.Linear's default variance, ignoring `weight`'s values.

        The buffer is silent in every case (U columns zero); for "svd" its V columns are the
        next right singular directions of `weight`.
        """
        if weight.dim() != 2:
            raise InRankValueError(
                f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}"
            )
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            rank,
            buffer=buffer,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        return layer._init_from(weight, bias, init, name)

    @torch.no_grad()
    def _init_from(self, matrix: torch.Tensor, bias, init: str, name: str) -> "FactoredLayer":
        """Factors of the out×in `matrix` by `init` (see `from_weight`); the bias copied."""
        if init not in INITS:
            raise InRankValueError(f"{name}: init must be one of {INITS}, got {init!r}")
        if matrix.is_meta:  # no values yet: inrank_fx.materialize initialises the layer later
            return self
        if init != "iid":
            make = _svd_factors if init == "svd" else _random_factors
            u, v = make(matrix, self.width, name)
            self.U.copy_(u)
            self.V.copy_(v)
            self.U[:, self.rank:] = 0.0  # the buffer starts silent
        if bias is not None:
            self.bias.copy_(bias.detach())
        self.mark_reference()
        return self

    def reset_parameters(self) -> None:
        """i.i.d. factors such that U·Vᵀ has nn.Linear's default weight variance, 1/(3·in),
        over the r active components; the buffer's U columns are zero (silent).

        With independent zero-mean entries, Var[(U·Vᵀ)_ij] = r·σ_u²·σ_v²; the two factors get
        the same scale so that neither dominates the gradient of the other.
        """
        dense_var = 1.0 / (3.0 * self.in_features)
        std = (dense_var / self.rank) ** 0.25
        with torch.no_grad():
            nn.init.normal_(self.U, 0.0, std)
            nn.init.normal_(self.V, 0.0, std)
            self.U[:, self.rank:] = 0.0
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.mark_reference()

    @torch.no_grad()
    def randomize_buffer(self, generator: torch.Generator | None = None) -> None:
        """Give the buffer random U columns at the scale of the active ones, as the reference
        implementation's buffer is (`InRankConfig(silent_buffer=False)`, for comparison): the
        layer is then no longer exactly rank r, and its spectrum holds random components."""
        if self.buffer:
            active = self.U[:, : self.rank]
            self.U[:, self.rank:] = _random_like(active, self.buffer, generator)
        self.mark_reference()

    @torch.no_grad()
    def mark_reference(self) -> None:
        """Take the current weight as W_0, the start of the cumulative update that
        `update_singular_values` measures. Called at construction; call it again to measure
        from here (e.g. after loading pretrained factors into a transformed model)."""
        # Silent (all-zero) trailing U columns add nothing to W_0: keep only the active ones.
        used = self.U.any(dim=0).nonzero() if not self.U.is_meta else None
        active = self.width if used is None else (int(used.max()) + 1 if used.numel() else 0)
        self.U0 = self.U[:, :active].detach().clone()
        self.V0 = self.V[:, :active].detach().clone()

    # -- the map ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.V
        if self.activation is not None:
            h = ACTIVATIONS[self.activation](h)
        return F.linear(h, self.U, self.bias)

    @property
    def width(self) -> int:
        """Components the layer computes with: rank + buffer."""
        return self.U.shape[1]

    @property
    def full_rank(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def buffer(self) -> int:
        """Spare components in use beyond the determined rank."""
        return self.width - self.rank

    @property
    def weight(self) -> torch.Tensor:
        """The dense out×in product U·Vᵀ (differentiable), for code that reads `.weight` of
        what used to be an nn.Linear. It costs a dense matmul: the forward never forms it.
        (With an `activation` the layer is not this linear map; shape, dtype and device are
        still the linear layer's.)"""
        return self.U @ self.V.T

    def singular_values(self) -> torch.Tensor:
        """Singular values of U·Vᵀ (descending, length `width`), from QR of the factors and an
        SVD of the small width×width core; the dense product is never formed. With an
        `activation`: the component magnitudes ‖u_i‖·‖v_i‖, descending."""
        if self.activation is not None:
            return self._component_norms().sort(descending=True).values
        return factor_singular_values(self.U.detach(), self.V.detach())

    def _component_norms(self) -> torch.Tensor:
        u, v = self.U.detach().float(), self.V.detach().float()
        return torch.linalg.vector_norm(u, dim=0) * torch.linalg.vector_norm(v, dim=0)

    def update_singular_values(self) -> torch.Tensor:
        """Singular values of the cumulative update U·Vᵀ − U0·V0ᵀ (descending, at most
        `full_rank` of them), from QR of the stacked factors; never the dense product."""
        if self.activation is not None:
            raise InRankValueError(
                "the cumulative update of a layer with an activation between its "
                "factors is not a linear map with a spectrum; use measure='weight'"
            )
        s = update_singular_values(self.U.detach(), self.V.detach(), self.U0, self.V0)
        return s[: self.full_rank]

    # -- resizing (use inrank_fx.set_ranks, which keeps the optimizer in step) ----------------

    @torch.no_grad()
    def grow(self, width: int, *, init: str = "zero", generator: torch.Generator | None = None) -> None:
        """Add components up to `width`; the existing ones keep their columns 0..w-1.

        init="zero": new U columns are zero and new V columns random at the scale of the
        existing V, so the layer's function is unchanged and the new components start learning
        through U's gradient (x·V_new)ᵀ·δ. init="random": both new columns random at the scale of
        the existing factors (the function changes a little).
        """
        extra = width - self.width
        if extra < 0 or width > self.full_rank:
            raise InRankValueError(
                f"grow: width {width} must be in [{self.width}, {self.full_rank}]"
            )
        if extra == 0:
            return
        new_v = _random_like(self.V, extra, generator)
        if init == "zero":
            new_u = self.U.new_zeros(self.out_features, extra)
        elif init == "random":
            new_u = _random_like(self.U, extra, generator)
        else:
            raise InRankValueError(f"grow: init must be 'zero' or 'random', got {init!r}")
        self.U = nn.Parameter(torch.cat([self.U, new_u], dim=1))
        self.V = nn.Parameter(torch.cat([self.V, new_v], dim=1))

    @torch.no_grad()
    def truncate(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the `width` leading singular components of U·Vᵀ, computed from the factors
        (thin QR of each, SVD of the core), split evenly as U√S, V√S. This rotates the basis.

        Returns the column maps (A, B) with U_new = U_old·A and V_new = V_old·B, so that the
        optimizer can carry its state into the new basis: a gradient of U maps by B (∂L/∂U_new =
        ∂L/∂W·V_new = ∂L/∂U_old·B) and a gradient of V by A."""
        if not 1 <= width <= self.width:
            raise InRankValueError(f"truncate: width {width} must be in [1, {self.width}]")
        if self.activation is not None:
            # No rotation is a symmetry of σ(x·V): keep the largest components, largest first.
            keep = self._component_norms().argsort(descending=True)[:width].to(self.U.device)
            select = torch.eye(self.width, dtype=self.U.dtype, device=self.U.device)[:, keep]
            self.U = nn.Parameter(self.U[:, keep].detach().clone())
            self.V = nn.Parameter(self.V[:, keep].detach().clone())
            self.rank = min(self.rank, width)
            return select, select
        dtype = self.U.dtype
        q_u, r_u = torch.linalg.qr(self.U.to(torch.float64))
        q_v, r_v = torch.linalg.qr(self.V.to(torch.float64))
        p, s, qh = torch.linalg.svd(r_u @ r_v.T)
        root = s[:width].sqrt()
        left, right = p[:, :width] * root, qh[:width].T * root
        self.U = nn.Parameter((q_u @ left).to(dtype))
        self.V = nn.Parameter((q_v @ right).to(dtype))
        self.rank = min(self.rank, width)
        # U = Q_u·R_u and R_u·R_vᵀ = P·S·Qᵀ give U_new = U·R_vᵀ·Q_k·S_k^(-1/2) (and V_new likewise)
        # without inverting R_u, which is singular while silent columns are zero. A zero
        # component maps from nothing.
        inv_root = torch.where(s[:width] > s[0] * 1e-12, 1 / root, torch.zeros_like(root))
        u_map = r_v.T @ qh[:width].T * inv_root
        v_map = r_u.T @ p[:, :width] * inv_root
        return u_map.to(dtype), v_map.to(dtype)

    # -- checkpoints: the rank is extra state; the width comes with the factors' shapes ------
    # A tensor, not a dict, so that tensor-only formats (safetensors, save_pretrained) take it.

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.rank], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        if torch.is_tensor(state) and state.numel() == 1:
            self.rank = int(state.item())
        else:
            raise InRankValueError(f"{type(self).__name__} extra state must hold the rank (a "
                                   f"one-element tensor), got {state!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Factors (or a reference) saved at another width: take the checkpoint's shapes first.
        u, v = state_dict.get(prefix + "U"), state_dict.get(prefix + "V")
        if self._factor_pair(u, v) and u.shape[-1] != self.width:
            self.U = nn.Parameter(self.U.new_empty(u.shape))
            self.V = nn.Parameter(self.V.new_empty(v.shape))
        u0, v0 = state_dict.get(prefix + "U0"), state_dict.get(prefix + "V0")
        if self._factor_pair(u0, v0) and u0.shape[-1] != self.U0.shape[-1]:
            self.U0, self.V0 = self.U0.new_empty(u0.shape), self.V0.new_empty(v0.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if u0 is None and v0 is None:
            # A checkpoint from before W_0 was kept: measure updates from the loaded weights.
            for key in (prefix + "U0", prefix + "V0"):
                if key in missing_keys:
                    missing_keys.remove(key)
            self.mark_reference()

    def _factor_pair(self, u, v) -> bool:
        """Whether u, v are an out×k and in×k pair of factors for this layer (for a stack, of
        every expert: the leading dimensions must match too)."""
        return (
            u is not None and v is not None and u.dim() == v.dim() == self.U.dim()
            and u.shape[:-1] == self.U.shape[:-1] and v.shape[:-1] == self.V.shape[:-1]
            and u.shape[-1] == v.shape[-1]
        )

    # -- accounting -------------------------------------------------------------------------

    def factored_params(self) -> int:
        """Parameters of the active factors (and bias)."""
        bias = self.out_features if self.bias is not None else 0
        return self.width * (self.in_features + self.out_features) + bias

    def dense_params(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    def flops_per_row(self) -> int:
        """Multiply-add FLOPs (2 per MAC) for one input row, bias excluded."""
        return 2 * self.width * (self.in_features + self.out_features)

    def dense_flops_per_row(self) -> int:
        return 2 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        ratio = self.factored_params() / self.dense_params()
        act = f", activation={self.activation}" if self.activation is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, buffer={self.buffer}, full_rank={self.full_rank}, "
            f"bias={self.bias is not None}{act}, params={ratio:.1%} of dense"
        )


class InRankLinear(FactoredLayer):
    """A factored, rank-adaptive drop-in for nn.Linear.

    Args:
        in_features, out_features: as nn.Linear.
        rank: the starting rank r (capped at min(in, out)).
        buffer: spare components computed beyond r (capped so that r + buffer ≤ min(in, out));
            they start silent (U columns zero).
        bias: whether the layer adds a bias (the bias is not factored).

    The constructor draws i.i.d. factors whose product has nn.Linear's default variance ("iid").
    Use `from_linear` / `from_weight` to start from a module's own weights: "svd" (spectral
    initialisation on a fresh model, compression on a trained one) or "random".

    `activation` ("silu", "gelu", "relu"; default None) puts a nonlinearity between the factors,
    y = σ(x·V)·Uᵀ + b, as CoLA does for training from scratch. Its components are then no longer
    interchangeable by rotation, so its "spectrum" is the component magnitudes ‖u_i‖·‖v_i‖ and
    truncation keeps the largest components instead of rotating by SVD; a silent component
    (U column zero) still leaves the function unchanged, so growth works as without it.
    """


def _random_like(factor: torch.Tensor, columns: int, generator) -> torch.Tensor:
    """`columns` new random columns at the RMS scale of the existing factor's entries (for a
    stack of factors, E×rows×w, new columns for every matrix)."""
    scale = factor.detach().float().pow(2).mean().sqrt().item() if factor.numel() else 0.0
    if scale == 0.0:
        scale = 1.0 / math.sqrt(factor.shape[-2])
    noise = torch.randn(*factor.shape[:-1], columns, generator=generator, dtype=torch.float32)
    return (noise * scale).to(device=factor.device, dtype=factor.dtype)


def _finite(weight: torch.Tensor, name: str) -> torch.Tensor:
    w = weight.detach()
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise InRankValueError(
            f"{name}: {bad} non-finite (NaN/Inf) entries; refusing to initialise from them"
        )
    return w


# Spectral init keeps only the top `width` components, so a randomized truncated SVD (Halko et al.,
# 2011: a Gaussian sketch with OVERSAMPLE extra columns and POWER_ITERATIONS rounds of A·Aᵀ)
# costs O(out·in·width) instead of the exact SVD's O(out·in·min(out, in)); what that saves on a
# large model is measured by benchmarks/bench_scale.py, and how close the sketch comes to the
# exact truncation on flat (Gaussian) spectra, the hardest case, in docs/DISTRIBUTED.md.
OVERSAMPLE = 10
POWER_ITERATIONS = 1
# Below this full rank the exact SVD takes < 0.1 s: keep it exact (and independent of the sketch).
EXACT_BELOW = 256


def top_singular(w: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `width` leading singular triplets (U: out×width, S, V: in×width) of the matrix `w`.

    Randomized where it is cheaper and accurate, for a narrow sketch (`width` + OVERSAMPLE at
    most a quarter of the full rank, full rank ≥ EXACT_BELOW); exact, in float64, otherwise.
    Runs on `w`'s device."""
    full = min(w.shape)
    sketch = width + OVERSAMPLE
    if full >= EXACT_BELOW and 4 * sketch <= full:
        return _randomized_svd(w, width, sketch)
    # float64 keeps the factors accurate enough that full rank reproduces the layer to float error.
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    return u[:, :width], s[:width], vh[:width].T


def _randomized_svd(w: torch.Tensor, width: int, sketch: int):
    """torch.svd_lowrank's algorithm (range finder with power iterations, QR after every product),
    written out only to draw the sketch from a seeded generator of its own: the caller's random
    stream is left as it was and the transform is reproducible."""
    a = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    generator = torch.Generator(device=a.device).manual_seed(0)
    sample = torch.randn(a.shape[1], sketch, generator=generator, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ sample).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ u)[:, :width], s[:width], vh[:width].T


def _svd_factors(weight: torch.Tensor, width: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of weight (out×in) split evenly: U = U_w·√S, V = V_w·√S."""
    w = _finite(weight, name)
    u, s, v = top_singular(w, width)
    root = s.sqrt()
    return (u * root).to(w.dtype), (v * root).to(w.dtype)


def _random_factors(
    weight: torch.Tensor, width: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random orthonormal directions carrying the top singular values of weight (out×in)."""
    w = _finite(weight, name)
    s = top_singular(w, width)[1].to(torch.float64)
    out_features, in_features = w.shape
    q_u = torch.linalg.qr(torch.randn(out_features, width, dtype=torch.float64)).Q
    q_v = torch.linalg.qr(torch.randn(in_features, width, dtype=torch.float64)).Q
    root = s.sqrt()
    return (q_u * root).to(w.dtype).to(w.device), (q_v * root).to(w.dtype).to(w.device)

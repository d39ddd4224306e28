"""A small GPT in the style of nanoGPT's model.py: the model the examples and tests train.

Token and position embeddings, pre-norm transformer blocks (causal self-attention + MLP), and a
language-model head tied to the token embedding, as in GPT-2. Every matmul against a weight is
an nn.Linear, which is what `inrank_fx.transform` factors; the tied head stays dense.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inrank_fx._io import atomic_destination, check_destination

from ..errors import InRankValueError


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 256  # byte-level
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        for name, module in self.named_modules():
            if name.endswith("c_proj"):  # GPT-2's scaled init of residual projections
                module.residual_projection = True
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # A second draw, as this model has always made, so that a seed builds the same
                # model as before _init_weights learnt the scaling (it is the same distribution).
                torch.nn.init.normal_(p, mean=0.0, std=self._std(True))

    def _std(self, residual_projection: bool) -> float:
        return 0.02 / math.sqrt(2 * self.config.n_layer) if residual_projection else 0.02

    def _init_weights(self, module: nn.Module) -> None:
        """The model's own init, one module at a time (what `inrank_fx.materialize` takes)."""
        if isinstance(module, nn.Linear):
            std = self._std(getattr(module, "residual_projection", False))
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T)."""
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self(idx), targets)


CHECKPOINT_FORMAT = "inrank_fx.demo.gpt/1"


def save_checkpoint(model: GPT, path) -> Path:
    """Write a dense GPT's config and weights (nanoGPT's checkpoint: model args and state_dict),
    atomically; `load_checkpoint` builds it again. The demo leaves its trained dense model so."""
    path = check_destination(path)
    payload = {"format": CHECKPOINT_FORMAT, "gpt": asdict(model.config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_destination(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path) -> GPT:
    """The GPT a `save_checkpoint` file holds (on the CPU)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InRankValueError(f"{path}: not a demo GPT checkpoint (written by save_checkpoint, "
                               f"as the demo's dense.pt)")
    model = GPT(GPTConfig(**payload["gpt"]))
    model.load_state_dict(payload["state_dict"])
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, for logits (B, T, vocab) and targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

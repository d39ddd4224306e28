"""Small models for the tests: each exercises one way of writing a matmul against a weight."""
import torch
import torch.nn.functional as F
from torch import nn


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 24)
    )


class FunctionalNet(nn.Module):
    """Weights held as bare parameters and multiplied in every spelling the pass knows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(48, 32) / 6)  # F.linear: out×in
        self.b = nn.Parameter(torch.randn(48) / 6)
        self.proj = nn.Parameter(torch.randn(48, 40) / 7)  # x @ proj: in×out
        self.back = nn.Parameter(torch.randn(32, 40) / 6)  # back @ x: out×in, on the left
        self.skip = nn.Parameter(torch.randn(32, 40) / 6)  # x @ skip.T, and addmm
        self.bias2 = nn.Parameter(torch.randn(40) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, self.w, self.b))  # 32 → 48
        h = h @ self.proj  # 48 → 40
        left = (self.back @ h.mT).mT  # 40 → 32, weight on the left
        g = torch.addmm(self.bias2, left, self.skip)  # 32 → 40
        return g + torch.mm(left, self.skip.mT.t()) + x.sum(-1, keepdim=True)


class Untraceable(nn.Module):
    """A root whose forward branches on data, so it cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.inner = FunctionalNet()
        self.direct = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.a(x)
        else:
            x = self.b(x)
        x = x + F.linear(x, self.direct.weight)  # reads a child's weight without calling it
        return self.inner(x)


class Tagger(nn.Module):
    """The PyTorch-tutorial transformer: embeddings, nn.TransformerEncoder with a padding mask,
    a per-token head."""

    def __init__(self, vocab: int = 100, d_model: int = 32, tags: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d_model, tags)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens), src_key_padding_mask=padding))

    @staticmethod
    def example(batch: int = 2, length: int = 7):
        lengths = torch.arange(batch) % (length - 2) + 3
        return (torch.randint(0, 100, (batch, length)),
                torch.arange(length)[None, :] >= lengths[:, None])


class Seq2Seq(nn.Module):
    """nn.Transformer (encoder + decoder) with a causal target mask."""

    def __init__(self, vocab: int = 100, d_model: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.transformer = nn.Transformer(d_model, 4, 2, 2, 2 * d_model, dropout=0.0,
                                          batch_first=True)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device)
        hidden = self.transformer(self.embed(src), self.embed(tgt), tgt_mask=causal,
                                  tgt_is_causal=True)
        return self.head(hidden)

    @staticmethod
    def example(batch: int = 2):
        return torch.randint(0, 100, (batch, 7)), torch.randint(0, 100, (batch, 5))

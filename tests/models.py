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

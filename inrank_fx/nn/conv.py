"""`InRankConv2d`: a Conv2d whose flattened kernel is held as InRankLinear's two factors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import FactoredLayer
from .torch_internals import pair


class InRankConv2d(FactoredLayer):
    """A Conv2d factored as a k×k conv to `width` channels followed by a 1×1 conv.

    The kernel, flattened to a matrix W (out × in·kh·kw), is U·Vᵀ as in InRankLinear, so ranks,
    singular values, growth and truncation work unchanged; the forward runs V as a k×k conv
    (with the original stride, padding and dilation) and U as a 1×1 conv. A 1×1 conv is a
    matmul over channels: both convs are then 1×1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        *,
        stride=1,
        padding=0,
        dilation=1,
        buffer: int = 0,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        kernel_size = pair(kernel_size)
        super().__init__(in_channels * kernel_size[0] * kernel_size[1], out_channels, rank,
                         buffer=buffer, bias=bias, device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.dilation = pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int, *, buffer: int = 0, init: str = "svd", name: str = ""
    ) -> "InRankConv2d":
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, buffer=buffer,
            bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        matrix = conv.weight.reshape(conv.out_channels, -1)
        return layer._init_from(matrix, conv.bias, init, name or "conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.V.T.reshape(self.width, self.in_channels, *self.kernel_size)
        h = F.conv2d(x, v, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.U[:, :, None, None], self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel (out, in, kh, kw) = U·Vᵀ reshaped (differentiable)."""
        return (self.U @ self.V.T).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        ratio = self.factored_params() / self.dense_params()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, rank={self.rank}, buffer={self.buffer}, "
            f"full_rank={self.full_rank}, bias={self.bias is not None}, params={ratio:.1%} of dense"
        )

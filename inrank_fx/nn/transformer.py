"""nn.Transformer and its parts, in a form whose linear layers the pass can factor.

nn.TransformerEncoderLayer's forward hands its children's weights to one fused kernel on its
inference fast path (eval mode, no grad), and nn.TransformerEncoder converts padded batches to
nested tensors on the same path. Everywhere else (training, or whenever grad is enabled) both run
the standard path, which only calls their children: self_attn (nn.MultiheadAttention), linear1,
linear2, norms and dropouts. The substitutes below always run the standard path, so that the pass
can swap those children for factored layers (`inrank_fx.passes.substitutes`, which
registers them). Their arithmetic is
PyTorch's standard path itself; the one difference from the originals is in eval mode without
grad, where the encoder's padded output positions are computed rather than set by the nested
tensor conversion (they are padding: no loss or prediction should read them).
"""
from __future__ import annotations

from torch import Tensor, nn


class InRankTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer that always runs the standard path (the children it calls
    may be factored)."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        # nn.TransformerEncoderLayer.forward after its fast-path branch. Its mask
        # canonicalisation is left to self_attn, which applies the same one.
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask,
                                   is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,
                                              is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class InRankTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """nn.TransformerDecoderLayer, whose forward already only calls its children: the subclass
    makes the pass trace it instead of treating it as a leaf."""


class _CallsChildren:
    calls_children_only = True  # its forward calls its children; it reads no weight itself


class InRankTransformerEncoder(_CallsChildren, nn.TransformerEncoder):
    """nn.TransformerEncoder without the nested-tensor conversion (its fast path reads the first
    layer's weights directly)."""

    @staticmethod
    def substituted(module: nn.TransformerEncoder) -> None:
        module._inrank_use_nested_tensor = module.use_nested_tensor
        module.use_nested_tensor = False

    @staticmethod
    def restored(module: nn.TransformerEncoder) -> None:
        module.use_nested_tensor = module.__dict__.pop("_inrank_use_nested_tensor")


class InRankTransformerDecoder(_CallsChildren, nn.TransformerDecoder):
    """nn.TransformerDecoder, taken as calling its layers."""


class InRankTransformer(_CallsChildren, nn.Transformer):
    """nn.Transformer, taken as calling its encoder and decoder."""


# library class → its substitute; inrank_fx.passes.substitutes registers them.
SUBSTITUTES = {
    nn.TransformerEncoderLayer: InRankTransformerEncoderLayer,
    nn.TransformerDecoderLayer: InRankTransformerDecoderLayer,
    nn.TransformerEncoder: InRankTransformerEncoder,
    nn.TransformerDecoder: InRankTransformerDecoder,
    nn.Transformer: InRankTransformer,
}

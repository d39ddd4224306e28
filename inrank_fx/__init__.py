"""inrank_fx: InRank (incremental low-rank learning) for any PyTorch model, as a torch.fx pass."""
from .config import InRankConfig
from .layers import InRankLinear
from .passes import register_function_handler, register_module_handler
from .summary import ranks, summary
from .transform import TransformReport, transform

__version__ = "0.1.0"

__all__ = [
    "InRankConfig",
    "InRankLinear",
    "TransformReport",
    "ranks",
    "register_function_handler",
    "register_module_handler",
    "summary",
    "transform",
]

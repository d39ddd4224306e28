"""inrank_fx: InRank (incremental low-rank learning) for any PyTorch model, as a torch.fx pass."""
from . import transformer as _transformer  # noqa: F401  (registers nn.Transformer's substitutes)
from .config import InRankConfig
from .controller import RankController, attach
from .distributed import DistributedRankController, InRankDistributedError
from .export.freeze import freeze
from .layers import InRankLinear
from .optim import OptimizerStateError
from .passes import (
    handlers_restored,
    register_function_handler,
    register_module_handler,
    register_substitute,
    unregister_function_handler,
    unregister_module_handler,
)
from .resize import RankChange, set_ranks
from .summary import ranks, summary
from .transform import TransformReport, transform

__version__ = "0.1.0"

__all__ = [
    "DistributedRankController",
    "InRankConfig",
    "InRankDistributedError",
    "InRankLinear",
    "OptimizerStateError",
    "RankChange",
    "RankController",
    "TransformReport",
    "attach",
    "freeze",
    "handlers_restored",
    "ranks",
    "register_function_handler",
    "register_module_handler",
    "register_substitute",
    "set_ranks",
    "summary",
    "transform",
    "unregister_function_handler",
    "unregister_module_handler",
]

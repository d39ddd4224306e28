"""inrank_fx: InRank (incremental low-rank learning) for any PyTorch model, as a torch.fx pass."""
from .config import InRankConfig
from .errors import InRankError, InRankTypeError, InRankValueError
from .export.freeze import freeze
from .nn import FactoredLayer, InRankConv2d, InRankLinear, ranks
from .passes import (
    handlers_restored,
    register_function_handler,
    register_module_handler,
    register_substitute,
    unregister_function_handler,
    unregister_module_handler,
)
from .passes.transform import TransformReport, transform
from .tools.summary import summary
from .training import (
    DistributedRankController,
    InRankDistributedError,
    OptimizerStateError,
    RankChange,
    RankController,
    attach,
    set_ranks,
)

__version__ = "0.1.0"

__all__ = [
    "DistributedRankController",
    "FactoredLayer",
    "InRankConfig",
    "InRankConv2d",
    "InRankDistributedError",
    "InRankError",
    "InRankLinear",
    "InRankTypeError",
    "InRankValueError",
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

"""Training: `attach` a controller to an optimizer, and ranks change on its steps.

attach → RankController (or DistributedRankController under DDP) → set_ranks, which resizes the
factors, carries the optimizer state (optim_state) and keeps torch.compile'd code compiled
(compile_policy). Imports only `inrank_fx.nn` and the package's leaves, never the pass or export.
"""
from .attach import attach
from .compile_policy import restore_compile_settings
from .controller import RankController
from .distributed import DistributedRankController, InRankDistributedError
from .optim_state import OptimizerStateError
from .resize import RankChange, set_ranks

__all__ = [
    "DistributedRankController",
    "InRankDistributedError",
    "OptimizerStateError",
    "RankChange",
    "RankController",
    "attach",
    "restore_compile_settings",
    "set_ranks",
]

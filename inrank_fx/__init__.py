"""inrank_fx: InRank (incremental low-rank learning) for any PyTorch model, as a torch.fx pass.

The public names load on first use (PEP 562), so that `import inrank_fx` and the `inrank-fx`
command answer `--help` without importing torch; `inrank_fx.transform` and the rest behave as
ordinary attributes, and the subpackages (`inrank_fx.integrations`, `inrank_fx.export`, ...)
are reachable as attributes after `import inrank_fx`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name → the module that defines it
_PUBLIC = {
    "InRankConfig": ".config",
    "InRankError": ".errors", "InRankTypeError": ".errors", "InRankValueError": ".errors",
    "InRankKeyError": ".errors", "InRankRuntimeError": ".errors",
    "freeze": ".export.freeze",
    "FactoredLayer": ".nn", "InRankConv2d": ".nn", "InRankLinear": ".nn", "ranks": ".nn",
    **dict.fromkeys(("handlers_restored", "register_function_handler",
                     "register_module_handler", "register_substitute",
                     "unregister_function_handler", "unregister_module_handler"), ".passes"),
    "TransformReport": ".passes.report", "transform": ".passes.transform",
    "materialize": ".passes.materialize",
    "Compression": ".passes.report", "compress": ".passes.compress",
    "summary": ".tools.summary",
    **dict.fromkeys(("DistributedRankController", "InRankDistributedError",
                     "OptimizerStateError", "RankChange", "RankController", "attach",
                     "set_ranks"), ".training"),
}
_SUBPACKAGES = ("cli", "config", "demo", "errors", "export", "integrations", "nn",
                "passes", "tools", "training")

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_SUBPACKAGES})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .config import InRankConfig
    from .errors import (
        InRankError,
        InRankKeyError,
        InRankRuntimeError,
        InRankTypeError,
        InRankValueError,
    )
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
    from .passes.compress import compress
    from .passes.materialize import materialize
    from .passes.report import Compression, TransformReport
    from .passes.transform import transform
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

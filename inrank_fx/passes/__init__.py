"""Graph passes: tracing frontends, matmul matchers (a registry), weight-use analysis, rewrite."""
from .matchers import (
    MatmulSite,
    NotFactorable,
    handlers_restored,
    register_function_handler,
    register_module_handler,
    unregister_function_handler,
    unregister_module_handler,
)
from .rewrite import factor_matmul_sites
from .substitutes import register_substitute

__all__ = [
    "MatmulSite",
    "NotFactorable",
    "factor_matmul_sites",
    "handlers_restored",
    "register_function_handler",
    "register_module_handler",
    "register_substitute",
    "unregister_function_handler",
    "unregister_module_handler",
]

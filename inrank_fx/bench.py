"""`inrank_fx.bench` is `inrank_fx.tools.bench` (its home since the package was layered)."""
import sys

from .tools import bench as _bench

sys.modules[__name__] = _bench

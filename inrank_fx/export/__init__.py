"""The export stage: freeze final ranks into a plain model, then ONNX and TensorRT artifacts.

Kept apart from `inrank_fx.passes` because it runs after training on a finished model and pulls
in optional dependencies (onnx, onnxruntime, torch-tensorrt) that training never needs; those are
imported only when an exporter runs.
"""
from ._common import (
    ExportError,
    ExportParityError,
    MissingDependencyError,
    check_inputs,
    flat_outputs,
)
from .freeze import FactoredConv2d, FactoredLinear, FrozenLayer, freeze, frozen_layers
from .onnx import RANKS_METADATA_KEY, OnnxExportReport, to_onnx
from .tensorrt import TensorRTReport, tensorrt_missing, to_tensorrt

__all__ = [
    "RANKS_METADATA_KEY",
    "ExportError",
    "ExportParityError",
    "FactoredConv2d",
    "FactoredLinear",
    "FrozenLayer",
    "MissingDependencyError",
    "OnnxExportReport",
    "TensorRTReport",
    "check_inputs",
    "flat_outputs",
    "freeze",
    "frozen_layers",
    "tensorrt_missing",
    "to_onnx",
    "to_tensorrt",
]

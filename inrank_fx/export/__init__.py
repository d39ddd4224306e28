"""The export stage: freeze final ranks into a plain model, then ONNX and TensorRT artifacts.

Kept apart from `inrank_fx.passes` because it runs after training on a finished model and pulls
in optional dependencies (onnx, onnxruntime, torch-tensorrt) that training never needs.
"""

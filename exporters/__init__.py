"""Outputs: merged safetensors folders, ONNX graphs, and their validation."""

"""File names of an ONNX export folder, shared by the exporter and `adapters run`.

A module of its own so that serving code can find a graph without importing torch.
"""

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"  # external weights, beside the graph
RECIPE_NAME = "export.json"

"""File names of an ONNX export folder, shared by the exporter and `adapters run`.

A module of its own so that serving code can find a graph without importing torch.
"""

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"  # external weights, beside the graph
RECIPE_NAME = "export.json"
FORMAT_SLOTS = "onnx_slots"  # export.json "format" of a slots graph (`adapters export --slots`)
GENAI_CONFIG_NAME = "genai_config.json"  # onnxruntime-genai's description of a KV-cache graph

# KV-cache graph tensor names (`%d`: the layer), as Optimum and onnxruntime-genai name them
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"

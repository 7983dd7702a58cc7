"""ONNX Runtime adapter files (`.onnx_adapter`): write, read, activate.

The format is ONNX Runtime's own (`onnxruntime.AdapterFormat`, flatbuffers): named
tensors that a session feeds as overridable initializers when the adapter is active for
a run (`LoraAdapter().Load(path)`, `RunOptions.add_active_adapter(adapter)`; 1.20+).
Serving therefore needs no code of ours; this module only writes files that fit a slot
graph (`exporters.slot_layout.parameters`) and activates them for validation.

ONNX Runtime's rules worth knowing (checked on the installed onnxruntime-gpu 1.31):
a parameter must name a graph input or an overridable initializer; several active
adapters must not share a parameter name; `run_with_iobinding` ignores active adapters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ADAPTER_SUFFIX = ".onnx_adapter"
FORMAT_ADAPTER_VERSION = 1  # our file layout of parameters (slot names, folded scale)


def write_adapter_file(path: Path, params: Mapping[str, np.ndarray], model_version: int = 1) -> None:
    """Write `params` as an ONNX Runtime adapter file at `path` (temp file, then rename)."""
    import onnxruntime as ort

    path = Path(path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(FORMAT_ADAPTER_VERSION)
    fmt.set_model_version(int(model_version))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params.items()})
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        fmt.export_adapter(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    """The parameters of an adapter file, as numpy arrays that own their memory.

    `OrtValue.numpy()` of a read adapter is a view of memory the OrtValue owns, freed with
    it: the arrays are copied while the values are alive (a view read garbage once they
    were collected)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    return {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}


class Activation:
    """`RunOptions` with one adapter file active (None: no adapter, the base model).

    Holds the loaded `LoraAdapter` as long as the options live: ONNX Runtime's run options
    keep only a pointer to it.
    """

    def __init__(self, path: Path | None):
        import onnxruntime as ort

        self.options = ort.RunOptions()
        self.adapter = None
        if path is not None:
            self.adapter = ort.LoraAdapter()
            self.adapter.Load(str(path))
            self.options.add_active_adapter(self.adapter)

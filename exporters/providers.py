"""Which ONNX Runtime execution provider really runs a graph.

onnxruntime-gpu lists CUDA and TensorRT as *available* on any machine, GPU or not; a
session asked for them then silently falls back to CPU (or fails while loading the
CUDA libraries). So a provider counts as usable only if a real session created with it
reports it first in `session.get_providers()`. `auto` takes the first usable of
TensorRT, CUDA, CPU; an explicit request that cannot be honoured is an `ExportError`
(validating on CPU what the user meant to serve on CUDA would prove the wrong thing).
Validation reports the provider of the session that ran, never the one asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from exporters.errors import ExportError

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# what each choice asks ONNX Runtime for (fallbacks after the first)
CHAINS = {
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}

# CUDA's float32 GEMMs may run in TF32 (10-bit mantissa) unless told not to: a float32
# graph must compute in float32 to be compared with float32 PyTorch at 1e-4.
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}

Probe = Callable[[str], bool]


def provider_chain(provider: str) -> list:
    """What `InferenceSession(providers=...)` gets for `provider` (short name), options included."""
    return [(p, PROVIDER_OPTIONS[p]) if p in PROVIDER_OPTIONS else p for p in CHAINS[provider]]


@contextlib.contextmanager
def quiet_ort(severity: int = 4) -> Iterator[None]:
    """Silence ONNX Runtime while it looks for GPU libraries, then restore its logger.

    Missing CUDA/TensorRT libraries are logged at ERROR level by the C++ side and the
    Python side *prints* an "EP Error" banner on fallback; neither may reach a user's
    terminal or a `--json` stdout for a condition that `auto` handles by design.
    """
    import io

    import onnxruntime as ort

    ort.set_default_logger_severity(severity)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(2)


def _probe_model() -> bytes:
    """A one-node float graph (Y = X + X): enough to make a provider load its libraries."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["X", "X"], ["Y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def can_run(provider: str) -> bool:
    """True when a session created for `provider` (short name) really runs on it."""
    import onnxruntime as ort

    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        return False
    try:
        with quiet_ort():
            sess = ort.InferenceSession(_probe_model(), providers=provider_chain(provider))
    except Exception:  # missing CUDA/TensorRT libraries, no device
        return False
    return sess.get_providers()[:1] == [wanted]


def choose_provider(requested: str, probe: Probe | None = None) -> str:
    """The short name of the provider to validate on (`auto`: first usable of TRT, CUDA, CPU).

    `probe` (default `can_run`) is injectable so the selection logic can be tested on a
    machine without a GPU.
    """
    probe = probe or can_run
    if requested == "auto":
        cuda = probe("cuda")  # TensorRT runs on CUDA: no CUDA, no TensorRT probe (and no noise)
        if cuda and probe("tensorrt"):
            return "tensorrt"
        return "cuda" if cuda else "cpu"
    if requested not in PROVIDERS:
        raise ExportError(f"--provider {requested!r} is not one of auto, {', '.join(PROVIDERS)}")
    if requested != "cpu" and not (probe("cuda") and (requested == "cuda" or probe(requested))):
        raise ExportError(f"--provider {requested}: {PROVIDERS[requested]} cannot create a session on this "
                          "machine (no GPU or missing libraries); use --provider auto or cpu")
    return requested


def open_session(model_path: str | Path, provider: str, intra_op_threads: int | None = None,
                 low_memory: bool = False):
    """An InferenceSession for `provider` (short name), with its fallback chain.

    `low_memory` (validation): no CPU memory arena, which keeps its high-water mark for
    the session's life; the same kernels run on the same values (logits measured bit for
    bit equal). Weight pre-packing stays on although it costs a transient copy of each
    MatMul weight: turning it off picks other MLAS kernels, whose results differ in the
    last bits (~3e-7 on the 106M bench model's logits), and validation checks what a
    default session serves.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    if low_memory:
        opts.enable_cpu_mem_arena = False
    with quiet_ort():
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=provider_chain(provider))


def short_name(ort_provider: str) -> str:
    """`CUDAExecutionProvider` -> `cuda` (unknown names are returned as they are)."""
    for short, full in PROVIDERS.items():
        if full == ort_provider:
            return short
    return ort_provider


def really_used(session) -> tuple[str, Sequence[str]]:
    """(short name of the first provider of the session, its whole provider list)."""
    used = list(session.get_providers())
    return short_name(used[0]), used

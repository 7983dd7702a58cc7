"""Will the validation fit in memory? Estimated before the slow part, refused clearly if not.

Validation holds, one after the other (never together): the float32 PyTorch reference
(built, run on every case and the recorded generation, then released), then one ONNX
Runtime session of the graph. Measured on the CPU provider (bench/bench_onnx_export.py,
106M-parameter Llama; bench/trace_onnx_memory.py gives the per-stage figures): a float32
graph's session costs about its weight bytes (external data is memory-mapped, pre-packed
MatMul weights replace the mapped ones); a float16 graph's costs about 2-2.5x its weight
bytes, because ONNX Runtime's CPU kernels run float32 and it keeps float32 copies of the
weights; int4 MatMulNBits weights are used packed. The reference costs its float32
parameter bytes. When the larger of the two exceeds the memory the system says is
available, validation cannot run here: that is a failed check with its own message, not
an out-of-memory kill halfway, and not a silent skip.
"""

from __future__ import annotations

# ONNX Runtime CPU session bytes per graph weight byte, by graph dtype (measured, see above)
SESSION_FACTOR = {"float32": 1.0, "float16": 2.5, "int4": 1.0}
HEADROOM = 512 << 20  # activations of the validation cases, allocator slack


def available_bytes() -> int:
    """Memory the system can give without swapping (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


def validation_need(graph_bytes: int, reference_bytes: int, dtype: str, provider: str) -> int:
    """Peak bytes validation adds to this process: the larger of session and reference, plus headroom."""
    session = int(graph_bytes * SESSION_FACTOR.get(dtype, 1.0)) if provider == "cpu" else 0
    return max(session, reference_bytes) + HEADROOM


def shortfall(graph_bytes: int, reference_bytes: int, dtype: str, provider: str, released: int = 0) -> str | None:
    """None when validation fits in the available memory, else the sentence that says why not.

    `released`: bytes this process holds now and frees before validation starts (the
    exported model), counted as available.
    """
    have = available_bytes() + released
    need = validation_need(graph_bytes, reference_bytes, dtype, provider)
    if need <= have:
        return None
    gb = 1 << 30
    return (f"validation cannot run in the memory available on {provider}: it needs about {need / gb:.1f} GiB "
            f"(a {dtype} graph of {graph_bytes / gb:.1f} GiB in ONNX Runtime after a float32 PyTorch reference "
            f"of {reference_bytes / gb:.1f} GiB) and {have / gb:.1f} GiB is available; nothing was written "
            "(--no-validate exports without the check)")


def release_memory() -> None:
    """Give freed memory back to the system before the next large allocation.

    A freed model's tensors below glibc's (self-raising, up to 32 MB) mmap threshold stay
    in malloc's heap after they are freed: resident, and counted again when ONNX Runtime
    then allocates its own buffers. A garbage collection (reference cycles of modules)
    and `malloc_trim(0)` return them; on a C library without `malloc_trim` this is only
    the collection.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# attributes in which onnxscript's pattern matchers keep the graph they last matched
_MATCHER_STATE = ("_graph", "_current_node", "_tracer", "_match")


def forget_exported_graph() -> int:
    """Drop the last exported graph that torch.onnx's optimizer keeps alive; returns how many holders.

    `torch.onnx.export(optimize=True)` runs onnxscript's rewriter, whose rules are module
    level objects; each rule's `SimplePatternMatcher` keeps the graph it last matched in
    its state (onnxscript 0.7). That graph's initializers wrap the exported module's
    parameters, so the whole model stayed resident after the export, beside the
    validation's reference (bench/trace_onnx_memory.py: +4.4 GB on the 1.1B model). The
    state is re-initialised by the matcher at its next match, so clearing it is safe.
    """
    import gc

    try:
        from onnxscript.rewriter import _matcher
    except ImportError:  # no onnxscript: nothing kept
        return 0
    frozen = gc.get_freeze_count() > 0  # `gc.freeze()`d objects are not listed by get_objects
    if frozen:  # (the CLI and `run_merge` freeze what their imports left alive)
        gc.unfreeze()
    cleared = 0
    try:
        for obj in gc.get_objects():
            if isinstance(obj, _matcher.PatternMatcher) and any(a in vars(obj) for a in _MATCHER_STATE):
                for attr in _MATCHER_STATE:
                    if attr in vars(obj):
                        setattr(obj, attr, None)
                cleared += 1
    finally:
        if frozen:  # the graph (and the model it held) is garbage now: collected, not frozen
            gc.collect()
            gc.freeze()
    return cleared

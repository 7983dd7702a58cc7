"""Text generation from an exported decoder graph on ONNX Runtime, through its KV cache. No torch.

Two engines drive the same graph:

- `genai`: onnxruntime-genai (`genai_config.json` in the folder; the runtime people
  deploy LLMs with on ONNX Runtime);
- `ort`: our own loop over an `InferenceSession` (`exporters.ort_decoder`), for folders
  genai cannot run: plain (`--no-kv-cache`) graphs, exports without genai_config.json,
  or a machine without onnxruntime-genai.

`auto` takes genai when the folder has a genai_config.json and onnxruntime-genai loads
it, else ort. Both engines: greedy (argmax, deterministic) unless a sampling option is
given; stop after `max_new_tokens` or at an end-of-sequence id (which is kept in the
tokens, as onnxruntime-genai does); the prompt is never part of `tokens`.

Timing: `time_to_first_token_s` is from the prompt being handed to the engine to the
first generated id; `tokens_per_s` is the decode rate after it ((n - 1) tokens over the
time from the first to the last token; 0 when only one token was generated).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import ExportError
from exporters.onnx_layout import GENAI_CONFIG_NAME, GRAPH_NAME

ENGINES = ("auto", "genai", "ort")
OnToken = Callable[[int], None]


class GenerationError(ExportError):
    """A folder, option or prompt that generation cannot work with (one line, exit 2)."""


@dataclass(frozen=True)
class Sampling:
    """Greedy when nothing is set; otherwise sampling with these settings."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature is None and self.top_k is None and self.top_p is None


@dataclass
class GenerationResult:
    tokens: list[int]
    engine: str
    provider: str
    prompt_tokens: int
    time_to_first_token_s: float
    tokens_per_s: float
    stopped: str  # "eos" | "max_new_tokens" | "context_length"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


@dataclass(frozen=True)
class ModelInfo:
    """What a folder tells about generation: graph, genai config, eos ids, context length."""

    folder: Path
    graph: Path
    genai_config: dict[str, Any] | None
    eos_ids: tuple[int, ...]
    context_length: int


def model_info(folder: Path) -> ModelInfo:
    """Read an export folder (`adapters merge --to onnx` output); `GenerationError` if it is none."""
    folder = Path(folder)
    graph = folder / GRAPH_NAME
    if not graph.is_file():
        raise GenerationError(f"{folder}: no {GRAPH_NAME} here (give an `adapters merge --to onnx` output folder)")
    genai: dict[str, Any] | None = None
    if (folder / GENAI_CONFIG_NAME).is_file():
        genai = _read_json(folder / GENAI_CONFIG_NAME)
    cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    eos: Any = (genai or {}).get("model", {}).get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    ctx = (genai or {}).get("model", {}).get("context_length") or cfg.get("max_position_embeddings") \
        or cfg.get("n_positions") or 2048
    return ModelInfo(folder, graph, genai, eos_ids, int(ctx))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise GenerationError(f"{path}: not valid JSON") from None


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def pick_engine(info: ModelInfo, engine: str) -> str:
    """`auto` -> genai when the folder and the machine allow it, else ort; explicit choices are checked."""
    if engine not in ENGINES:
        raise GenerationError(f"--engine {engine!r} is not one of {', '.join(ENGINES)}")
    can_genai = info.genai_config is not None and genai_available()
    if engine == "genai" and not can_genai:
        why = (f"no {GENAI_CONFIG_NAME} (a --no-kv-cache or encoder export)" if info.genai_config is None
               else "onnxruntime-genai is not installed")
        raise GenerationError(f"{info.folder}: onnxruntime-genai cannot run this folder: {why}; use --engine ort")
    if engine == "auto":
        return "genai" if can_genai else "ort"
    return engine


def generate(folder: Path, prompt_ids: Sequence[int], max_new_tokens: int = 32, sampling: Sampling | None = None,
             provider: str = "auto", engine: str = "auto", on_token: OnToken | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` ids after `prompt_ids` with the graph in `folder`."""
    from exporters.providers import choose_provider

    sampling = sampling or Sampling()
    info = model_info(folder)
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise GenerationError("the prompt has no tokens")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    if len(prompt) >= info.context_length:
        raise GenerationError(f"the prompt has {len(prompt)} tokens; the model's context is {info.context_length}")
    vocab = _vocab_size(info)
    if vocab is not None and (max(prompt) >= vocab or min(prompt) < 0):
        bad = max(prompt) if max(prompt) >= vocab else min(prompt)
        raise GenerationError(f"token id {bad} is outside the vocabulary (ids 0 to {vocab - 1})")
    chosen = choose_provider(provider)
    which = pick_engine(info, engine)
    run = _genai_generate if which == "genai" else _ort_generate
    return run(info, prompt, max_new_tokens, sampling, chosen, on_token or (lambda _t: None))


def _vocab_size(info: ModelInfo) -> int | None:
    if info.genai_config is not None:
        return int(info.genai_config["model"]["vocab_size"])
    cfg = info.folder / "config.json"
    return int(_read_json(cfg).get("vocab_size") or 0) or None if cfg.is_file() else None


def _budget(info: ModelInfo, prompt: list[int], max_new_tokens: int) -> tuple[int, str]:
    room = info.context_length - len(prompt)
    return (max_new_tokens, "max_new_tokens") if max_new_tokens <= room else (room, "context_length")


# --------------------------------------------------------------------------- our loop


def sample_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One id from the last position's logits: argmax, or temperature/top-k/top-p sampling."""
    logits = logits.astype(np.float64)
    if sampling.greedy:
        return int(np.argmax(logits))
    temperature = 1.0 if sampling.temperature is None else sampling.temperature
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


def _ort_generate(info: ModelInfo, prompt: list[int], max_new_tokens: int, sampling: Sampling, provider: str,
                  on_token: OnToken) -> GenerationResult:
    from exporters.ort_decoder import OrtDecoder
    from exporters.providers import open_session, really_used

    try:
        session = open_session(info.graph, provider)
        decoder = OrtDecoder(session)
    except ValueError as exc:
        raise GenerationError(f"{info.graph}: not a decoder graph ({exc})") from None
    except Exception as exc:
        raise GenerationError(f"{info.graph}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") \
            from None
    used, _ = really_used(session)
    budget, stop_reason = _budget(info, prompt, max_new_tokens)
    rng = np.random.default_rng(sampling.seed)
    ids = np.asarray([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    state = decoder.start(1)
    tokens: list[int] = []
    t0 = time.perf_counter()
    t_first = t_last = t0
    while len(tokens) < budget:
        logits, state = decoder.step(ids, mask, state)
        nxt = sample_next(logits[0, -1], sampling, rng)
        t_last = time.perf_counter()
        if not tokens:
            t_first = t_last
        tokens.append(nxt)
        on_token(nxt)
        if nxt in info.eos_ids:
            stop_reason = "eos"
            break
        ids = np.asarray([[nxt]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
    return GenerationResult(tokens, "ort", used, len(prompt), round(t_first - t0, 6),
                            _rate(len(tokens), t_first, t_last), stop_reason,
                            {"kv_cache": decoder.kv_cache})


def _rate(n: int, t_first: float, t_last: float) -> float:
    return round((n - 1) / (t_last - t_first), 3) if n > 1 and t_last > t_first else 0.0


# --------------------------------------------------------------------------- onnxruntime-genai


def _genai_generate(info: ModelInfo, prompt: list[int], max_new_tokens: int, sampling: Sampling, provider: str,
                    on_token: OnToken) -> GenerationResult:
    import onnxruntime_genai as og

    try:
        config = og.Config(str(info.folder))
        config.clear_providers()
        if provider != "cpu":  # genai runs TensorRT graphs through its CUDA provider
            provider = "cuda"
            config.append_provider(provider)
        model = og.Model(config)
    except Exception as exc:
        raise GenerationError(f"{info.folder}: onnxruntime-genai cannot load it "
                              f"({str(exc).splitlines()[0][:160]}); use --engine ort") from None
    budget, stop_reason = _budget(info, prompt, max_new_tokens)
    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"max_length": len(prompt) + budget, "do_sample": not sampling.greedy}
    if not sampling.greedy:
        options.update(temperature=1.0 if sampling.temperature is None else sampling.temperature,
                       top_k=sampling.top_k or int(info.genai_config["model"]["vocab_size"]),  # type: ignore[index]
                       top_p=1.0 if sampling.top_p is None else sampling.top_p)
        if sampling.seed is not None:
            options["random_seed"] = int(sampling.seed)
    else:
        options.update(top_k=1)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    tokens: list[int] = []
    t0 = time.perf_counter()
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    t_first = t_last = t0
    while not generator.is_done() and len(tokens) < budget:
        generator.generate_next_token()
        nxt = int(generator.get_next_tokens()[0])
        t_last = time.perf_counter()
        if not tokens:
            t_first = t_last
        tokens.append(nxt)
        on_token(nxt)
        if nxt in info.eos_ids:
            stop_reason = "eos"
            break
    return GenerationResult(tokens, "genai", provider, len(prompt), round(t_first - t0, 6),
                            _rate(len(tokens), t_first, t_last), stop_reason, {"kv_cache": True})

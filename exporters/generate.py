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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import ExportError
from exporters.onnx_layout import FORMAT_SLOTS, GENAI_CONFIG_NAME

ENGINES = ("auto", "genai", "ort")
OnToken = Callable[[int], None]


class GenerationError(ExportError):
    """A folder, option or prompt that generation cannot work with (one line, exit 2)."""


@dataclass(frozen=True)
class Sampling:
    """Greedy when nothing is set (or temperature 0); otherwise sampling with these settings."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or (self.temperature is None and self.top_k is None and self.top_p is None)

    def check(self) -> None:
        """`GenerationError` naming the option for a value generation cannot use (NaN included)."""
        t, p = self.temperature, self.top_p
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise GenerationError(f"--temperature {t}: give a finite number >= 0 (0: greedy)")
        if p is not None and not (isinstance(p, (int, float)) and math.isfinite(p) and 0 < p <= 1):
            raise GenerationError(f"--top-p {p}: give a number in (0, 1]")
        if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k < 2**31):
            raise GenerationError(f"--top-k {self.top_k}: give an integer from 1 to 2**31-1")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**31):
            raise GenerationError(f"--seed {self.seed}: give an integer from 0 to 2**31-1")


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
    """What a folder tells about generation: graph, genai config, eos ids, context length, vocabulary."""

    folder: Path
    graph: Path
    genai_config: dict[str, Any] | None
    eos_ids: tuple[int, ...]
    context_length: int
    vocab_size: int | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # export.json ({} when absent)


def model_info(folder: Path) -> ModelInfo:
    """Read an export folder (`adapters merge --to onnx` output); `GenerationError` if it is none.

    The graph, `genai_config.json` and `config.json` are read under the folder rule and by
    the strict JSON reader (`exporters.export_folder`); the fields generation uses (vocab
    size, context length, eos ids) are type-checked, so a hostile file is one line.
    """
    from exporters.export_folder import graph_and_recipe, positive_int, read_json_object

    folder = Path(folder)
    if not folder.is_dir():
        raise GenerationError(f"{folder}: no such folder (give an `adapters merge --to onnx` output folder)")
    graph, recipe = graph_and_recipe(folder, GenerationError)
    genai = read_json_object(folder, GENAI_CONFIG_NAME, "genai config", GenerationError)
    cfg = read_json_object(folder, "config.json", "model config", GenerationError) or {}
    gmodel: dict[str, Any] = {}
    if genai is not None:
        gmodel = genai.get("model")  # type: ignore[assignment]
        if not isinstance(gmodel, dict):
            raise GenerationError(f"{folder / GENAI_CONFIG_NAME}: no \"model\" object")
    where = folder / (GENAI_CONFIG_NAME if genai is not None else "config.json")
    vocab_value = gmodel.get("vocab_size") if genai is not None else cfg.get("vocab_size")
    if genai is not None and vocab_value is None:
        raise GenerationError(f"{where}: no model.vocab_size")
    vocab = positive_int(vocab_value, f"{where}: vocab_size", GenerationError) if vocab_value is not None else None
    eos: Any = gmodel.get("eos_token_id") if genai is not None else cfg.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos]
    if any(e is not None and (not isinstance(e, int) or isinstance(e, bool) or e < 0) for e in eos_list) \
            or len(eos_list) > 1024:
        raise GenerationError(f"{where}: eos_token_id {str(eos)[:60]} is not a token id or a list of them")
    eos_ids = tuple(int(e) for e in eos_list if e is not None)
    ctx_value = gmodel.get("context_length") if genai is not None else None
    if ctx_value is None:
        ctx_value = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    ctx = positive_int(ctx_value, f"{where}: context length", GenerationError)
    return ModelInfo(folder, graph, genai, eos_ids, ctx, vocab, recipe)


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
             provider: str = "auto", engine: str = "auto", on_token: OnToken | None = None,
             adapter: Path | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` ids after `prompt_ids` with the graph in `folder`.

    `adapter`: an `.onnx_adapter` file (`adapters pack`) active for the whole generation;
    `folder` must then be a slots graph whose slots the file fits (`check_adapter_file`).
    """
    from exporters.providers import choose_provider

    sampling = sampling or Sampling()
    sampling.check()
    info = model_info(folder)
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise GenerationError("the prompt has no tokens")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    if len(prompt) >= info.context_length:
        raise GenerationError(f"the prompt has {len(prompt)} tokens; the model's context is {info.context_length}")
    check_vocabulary(prompt, info.vocab_size)
    if adapter is not None:
        check_adapter_file(info, Path(adapter))
    chosen = choose_provider(provider)
    which = pick_engine(info, engine)
    run = _genai_generate if which == "genai" else _ort_generate
    result = run(info, prompt, max_new_tokens, sampling, chosen, on_token or (lambda _t: None), adapter)
    result.extra["adapter"] = str(adapter) if adapter is not None else None
    return result


def check_slots_graph(info: ModelInfo) -> dict[str, Any]:
    """The recipe of `info` if it is a slots graph an adapter file can be activated on (not mixed)."""
    recipe = info.recipe
    if recipe.get("format") != FORMAT_SLOTS or recipe.get("mixed"):
        what = "a mixed graph (its adapters are inside)" if recipe.get("mixed") else "not a slots graph"
        raise GenerationError(f"--adapter: {info.folder} is {what}; export one with adapters export --slots")
    return recipe


def check_adapter_file(info: ModelInfo, path: Path) -> None:
    """`GenerationError` unless `path` is an adapter file that fits the slots graph of `info`.

    The folder must be a (not mixed) slots graph; the file a regular file that ONNX
    Runtime reads as an adapter, every parameter of which names a slot of the graph with
    the recorded shape (a LoRA rank may differ: the graph's rank axis is dynamic).
    """
    from exporters.ort_adapter import read_adapter_file
    from mora_core.safe_io import open_regular

    recipe = check_slots_graph(info)
    with open_regular(path, GenerationError):  # a FIFO or a folder is refused before ONNX Runtime sees it
        pass
    try:
        params = read_adapter_file(path)
    except Exception as exc:
        raise GenerationError(f"--adapter {path}: not an ONNX Runtime adapter file "
                              f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    slots = recipe.get("parameters")
    if not isinstance(slots, dict):
        raise GenerationError(f"{info.folder / 'export.json'}: no slot parameters recorded")
    if not params:
        raise GenerationError(f"--adapter {path}: holds no parameters")
    for name, value in sorted(params.items()):
        want = (slots.get(name) or {}).get("shape") if isinstance(slots.get(name), dict) else None
        if want is None:
            raise GenerationError(f"--adapter {path}: parameter {name[:120]} is not a slot of {info.folder}")
        if len(want) != value.ndim or any(isinstance(w, int) and w != d for w, d in zip(want, value.shape)):
            raise GenerationError(f"--adapter {path}: parameter {name[:120]} has shape {list(value.shape)}, "
                                  f"the slot takes {want}")


def check_vocabulary(prompt: Sequence[int], vocab: int | None) -> None:
    """`GenerationError` for the first id outside [0, vocab) (ONNX Runtime's own message is cut mid-word)."""
    if vocab is None:
        return
    bad = next((i for i in prompt if not 0 <= i < vocab), None)
    if bad is not None:
        raise GenerationError(f"token id {bad} is outside the vocabulary (ids 0 to {vocab - 1})")


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
                  on_token: OnToken, adapter: Path | None = None) -> GenerationResult:
    from exporters.ort_adapter import Activation
    from exporters.ort_decoder import OrtDecoder
    from exporters.providers import open_session, really_used

    try:
        session = open_session(info.graph, provider)
        activation = Activation(adapter)  # held while the decoder runs: the options point at it
        decoder = OrtDecoder(session, run_options=activation.options)
    except ValueError as exc:
        raise GenerationError(f"{info.graph}: not a decoder graph ({exc})") from None
    except Exception as exc:
        raise GenerationError(f"{info.graph}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") \
            from None
    used, _ = really_used(session)
    if info.vocab_size is None:
        check_vocabulary(prompt, decoder.vocab_size)
    budget, stop_reason = _budget(info, prompt, max_new_tokens)
    rng = np.random.default_rng(sampling.seed)
    ids = np.asarray([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    state = decoder.start(1)
    out = _Tokens(info.eos_ids, on_token)
    while len(out.ids) < budget:
        try:
            logits, state = decoder.step(ids, mask, state)
        except Exception as exc:
            raise GenerationError(f"{info.graph}: inference failed after {len(out.ids)} tokens "
                                  f"({str(exc).splitlines()[0][:160]})") from None
        nxt = sample_next(logits[0, -1], sampling, rng)
        if out.add(nxt):
            stop_reason = "eos"
            break
        ids = np.asarray([[nxt]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
    return out.result("ort", used, len(prompt), stop_reason, {"kv_cache": decoder.kv_cache})


class _Tokens:
    """The generated ids and their timing, the same for both engines: `add(id)` tells
    `on_token` and answers whether the id ends the text (an end-of-sequence id)."""

    def __init__(self, eos_ids: Any, on_token: OnToken):
        self.ids: list[int] = []
        self.eos_ids, self.on_token = eos_ids, on_token
        self.t0 = self.t_first = self.t_last = time.perf_counter()

    def add(self, token_id: int) -> bool:
        self.t_last = time.perf_counter()
        if not self.ids:
            self.t_first = self.t_last
        self.ids.append(token_id)
        self.on_token(token_id)
        return token_id in self.eos_ids

    def result(self, engine: str, provider: str, prompt_tokens: int, stopped: str,
               extra: dict[str, Any]) -> GenerationResult:
        n, span = len(self.ids), self.t_last - self.t_first
        rate = round((n - 1) / span, 3) if n > 1 and span > 0 else 0.0
        return GenerationResult(self.ids, engine, provider, prompt_tokens, round(self.t_first - self.t0, 6),
                                rate, stopped, extra)


# --------------------------------------------------------------------------- onnxruntime-genai


def _genai_generate(info: ModelInfo, prompt: list[int], max_new_tokens: int, sampling: Sampling, provider: str,
                    on_token: OnToken, adapter: Path | None = None) -> GenerationResult:
    import onnxruntime_genai as og

    from exporters.export_folder import check_folder

    check_folder(info.folder, GenerationError)  # genai opens the graph and tokenizer files itself
    try:
        config = og.Config(str(info.folder))
        config.clear_providers()
        if provider != "cpu":  # genai runs TensorRT graphs through its CUDA provider
            provider = "cuda"
            config.append_provider(provider)
        model = og.Model(config)
        adapters = None
        if adapter is not None:  # onnxruntime-genai's multi-LoRA API feeds the file's overridable initializers
            adapters = og.Adapters(model)
            adapters.load(str(adapter), "adapter")
    except Exception as exc:
        raise GenerationError(f"{info.folder}: onnxruntime-genai cannot load it "
                              f"({str(exc).splitlines()[0][:160]}); use --engine ort") from None
    budget, stop_reason = _budget(info, prompt, max_new_tokens)
    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"max_length": len(prompt) + budget, "do_sample": not sampling.greedy}
    if not sampling.greedy:
        options.update(temperature=1.0 if sampling.temperature is None else sampling.temperature,
                       top_k=min(sampling.top_k or info.vocab_size or 1, info.vocab_size or 1),
                       top_p=1.0 if sampling.top_p is None else sampling.top_p)
        if sampling.seed is not None:
            options["random_seed"] = int(sampling.seed)
    else:
        options.update(top_k=1)
    out = _Tokens(info.eos_ids, on_token)
    try:
        params.set_search_options(**options)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, "adapter")
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        while not generator.is_done() and len(out.ids) < budget:
            generator.generate_next_token()
            if out.add(int(generator.get_next_tokens()[0])):
                stop_reason = "eos"
                break
    except RuntimeError as exc:  # genai reports its failures as RuntimeError
        raise GenerationError(f"{info.folder}: onnxruntime-genai failed after {len(out.ids)} tokens "
                              f"({str(exc).splitlines()[0][:160]}); use --engine ort") from None
    return out.result("genai", provider, len(prompt), stop_reason, {"kv_cache": True})

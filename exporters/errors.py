"""The exporters' library errors. The CLI maps them to exit codes; nothing here knows about it.

- `ExportError`: the input cannot be exported (a base, an option, a provider): exit 2.
- `ValidationFailed`: the output was built and a check ran on it and failed: exit 1.
"""

from __future__ import annotations


class ExportError(ValueError):
    """A base model, option or provider that the exporters cannot work with (one line naming it)."""


class ValidationFailed(RuntimeError):
    """A produced output failed its check (e.g. ONNX vs PyTorch outside tolerance); nothing was kept."""

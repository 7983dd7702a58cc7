"""Errors a user can cause while exporting: one line naming the input, exit code 2."""

from __future__ import annotations

from mora_core.errors import MoraCoreError


class ExportError(MoraCoreError):
    """A base model, option or provider that the ONNX exporter cannot work with."""

"""The math of adapter merging: specs, delta weights, unmerged forward, streaming merge.

Nothing here knows about the registry or a database; tensors come from and go to
safetensors files, never pickles.
"""

from mora_core.errors import AdapterError, MergeError, MoraCoreError

__all__ = ["AdapterError", "MergeError", "MoraCoreError"]

"""Errors a user can cause. Each carries one line that names the input and what is wrong."""


class MoraCoreError(ValueError):
    """Base class: a problem with the user's input, never a bug in this package."""


class AdapterError(MoraCoreError):
    """An adapter folder or file that cannot be read, or that is inconsistent."""


class MergeError(MoraCoreError):
    """Adapters that do not fit the base they are merged into, or a merge that went non-finite."""

"""Errors a user can cause. Each carries one line naming the input and what is wrong."""


class RegistryError(ValueError):
    """A bad name, an unknown or ambiguous reference, a corrupt store: never a bug here.

    The CLI prints `error: <message>` and exits 1; a traceback is reserved for bugs.
    """


class IntegrityError(RegistryError):
    """Stored bytes no longer match their recorded digest (the store was altered)."""


class StoreMissing(RegistryError):
    """A command that only reads found no registry where it was pointed (nothing is created)."""

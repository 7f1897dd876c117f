"""The one error base: every mistake a user can act on is a :class:`DefectscopeError`.

The CLI prints such an error as one line (``defectscope: error: ...``) and exits 2; anything else is a bug
and keeps its traceback (``--debug`` shows the traceback of a user error too). Each error also keeps the
builtin base it always had (``ValueError``, ``FileNotFoundError``...), so ``except ValueError`` in a caller's
code still catches it.
"""

from __future__ import annotations


class DefectscopeError(Exception):
    """A mistake in the input, the configuration or the environment, with a message that says what to do."""


class UsageError(DefectscopeError, ValueError):
    """An argument or option value that cannot be used as given."""


class InputNotFound(DefectscopeError, FileNotFoundError):
    """A file or folder the user named does not exist."""

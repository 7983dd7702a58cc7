"""PEFT's module patterns (`rank_pattern`, `alpha_pattern`, `target_modules`), matched in bounded time.

PEFT semantics, kept exactly: a `rank_pattern`/`alpha_pattern` key applies to a module
when `re.match(rf"(.*\\.)?({key})$", module)` succeeds (a plain name matches the module's
last components, a regex matches a dot-separated tail); a string `target_modules` must
`re.fullmatch` the module path; a list entry must equal the path or end it after a dot.

Why not `re`: the keys come from a file someone handed over, and a backtracking pattern
such as `(a|a)+b` takes exponential time on a module name of 30 `a`s (47 s were
measured). Matching uses the `regex` engine (re-compatible syntax) with a *time budget
shared by every match of one adapter* (`PATTERN_BUDGET_S`, CPU seconds as the engine
measures them): a table that exhausts it is refused with one line naming the key,
whatever the module count. Plain names and
ordinary regexes take microseconds; the budget is never near for them. Keys that do not
compile, or longer than `MAX_KEY_CHARS`, are refused when the config is read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import regex

PATTERN_BUDGET_S = 1.0  # seconds of matching (the regex engine counts CPU time)
MAX_KEY_CHARS = 1000


class PatternError(ValueError):
    """A key that cannot be used; the caller adds the file and the table's name."""


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern)


def check_key(key: str, whole: bool = False) -> None:
    """Refuse a key that is too long or not a valid regular expression (PatternError)."""
    if not isinstance(key, str) or not key:
        raise PatternError(f"{key!r} is not a module name or pattern")
    if len(key) > MAX_KEY_CHARS:
        raise PatternError(f"{key[:40]!r}... is longer than {MAX_KEY_CHARS} characters")
    try:
        _compiled(key if whole else rf"(.*\.)?({key})$")
    except regex.error as exc:
        raise PatternError(f"{key!r} is not a valid regular expression ({exc})") from None


class Matcher:
    """One adapter's pattern lookups, sharing one time budget; results are memoised."""

    def __init__(self, budget_s: float = PATTERN_BUDGET_S):
        self._left = budget_s
        self._memo: dict[tuple[str, str, bool], bool] = {}

    def matches(self, key: str, module: str, whole: bool = False) -> bool:
        """PEFT's test of `key` against `module` (`whole`: fullmatch, as a string target_modules)."""
        memo_key = (key, module, whole)
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        if self._left <= 0:
            raise PatternError(f"{key!r} exhausted the {PATTERN_BUDGET_S:g} s matching budget")
        pattern = _compiled(key) if whole else _compiled(rf"(.*\.)?({key})$")
        started = time.thread_time()
        try:
            found = (pattern.fullmatch(module, timeout=self._left) if whole
                     else pattern.match(module, timeout=self._left)) is not None
        except TimeoutError:
            self._left = 0
            raise PatternError(f"{key!r} takes more than {PATTERN_BUDGET_S:g} s to match module names "
                               "(catastrophic backtracking?); use plain module names or a simpler regex") from None
        finally:
            self._left -= time.thread_time() - started
        self._memo[memo_key] = found
        return found

    def lookup(self, patterns: dict[str, Any], module: str) -> str | None:
        """The key of `patterns` that applies to `module`: the exact name first, then PEFT's regex."""
        if module in patterns:
            return module
        for key in patterns:
            if self.matches(key, module):
                return key
        return None

    def targeted(self, target_modules: str | Iterable[str], module: str) -> bool:
        """Whether PEFT's `target_modules` selects `module`."""
        if isinstance(target_modules, str):
            return self.matches(target_modules, module, whole=True)
        return any(module == t or module.endswith("." + t) for t in target_modules)

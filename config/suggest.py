"""Did-you-mean: the closest known name to a misspelt one, for messages about keys, roles, hosts and services."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name `word` is most likely a typo of, or None when nothing is close."""
    candidates = list(dict.fromkeys(known))
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not found:  # a different case only (`Statsd`, `ingRess`) is below difflib's cutoff for short words
        found = [c for c in candidates if c.lower() == word.lower()][:1]
    return found[0] if found else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`; did you mean 'ingress'?`, or '' when nothing is close."""
    match = closest(word, known)
    return f"; did you mean {match!r}?" if match else ""

"""`enclave lab …` subcommands (filled in by the lab issue)."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def register(sub: Any, add_stack_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the lab's subcommands to the `enclave` parser."""

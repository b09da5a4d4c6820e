"""Shared fixtures: the project's stacks, loaded the way the CLI and the program load them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STACKS = ROOT / "stacks"


def stack_document(name: str) -> dict[str, Any]:
    """A stack file as a mutable dict, to derive variants from in tests."""
    return copy.deepcopy(yaml.safe_load((STACKS / f"Pulumi.{name}.yaml").read_text()))


@pytest.fixture
def prod_document() -> dict[str, Any]:
    return stack_document("prod")

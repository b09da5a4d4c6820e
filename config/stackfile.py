"""Reading `stacks/Pulumi.<stack>.yaml` outside Pulumi (CLI, lab, tests), with the same checks as the program."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .schema import StackConfig, StackError, StackIssue, enclave_keys, load_config

PROJECT_FILE = "Pulumi.yaml"


@dataclass(frozen=True)
class Stack:
    name: str
    config: StackConfig
    path: Path | None = None


def project_root(start: Path | None = None) -> Path:
    """The directory holding Pulumi.yaml: the current one or a parent, else the one this package came from."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / PROJECT_FILE).is_file():
            return candidate
    return Path(__file__).resolve().parent.parent


def stack_path(name: str, root: Path | None = None) -> Path:
    return project_root(root) / "stacks" / f"Pulumi.{name}.yaml"


def stack_name_of(path: Path) -> str:
    parts = path.name.split(".")
    if len(parts) >= 3 and parts[0] == "Pulumi" and parts[-1] in ("yaml", "yml"):
        return ".".join(parts[1:-1])
    return path.stem


def parse_stack_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StackError([StackIssue("(file)", f"not valid YAML: {exc}")], source) from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise StackError([StackIssue("config", "a stack file is a mapping with a `config:` mapping inside")], source)
    return enclave_keys(document["config"], source)


def load_stack_file(path: Path, name: str | None = None) -> Stack:
    if not path.is_file():
        raise StackError([StackIssue("(file)", f"{path} does not exist")], str(path))
    values = parse_stack_yaml(path.read_text(), str(path))
    return Stack(name or stack_name_of(path), load_config(values, str(path)), path)


def load_stack(name: str, root: Path | None = None) -> Stack:
    path = stack_path(name, root)
    if not path.is_file():
        known = sorted(stack_name_of(p) for p in path.parent.glob("Pulumi.*.yaml"))
        raise StackError(
            [StackIssue("--stack", f"no stack {name!r}: {path} does not exist; known stacks: {', '.join(known) or 'none'}")],
            str(path),
        )
    return load_stack_file(path, name)

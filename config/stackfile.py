"""Reading `stacks/Pulumi.<stack>.yaml` outside Pulumi (CLI, lab, tests), with the same checks as the program."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .schema import StackConfig, StackError, StackIssue, droplet_name_issues, enclave_keys, load_config

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (PyYAML keeps the last one silently, so a
    role pasted twice under one name would vanish); Pulumi's own YAML reader refuses duplicates too."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then `count: 2` overrides on purpose
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping (first on line {seen[key] + 1}); "
                    "keep one, or rename the second", key_node.start_mark,
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where and what, plus the usual cause of the common mistakes."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"not valid YAML: {exc}"
    mark = exc.problem_mark
    problem = exc.problem or "syntax error"
    hint = ""
    if "'\\t'" in problem:
        hint = "; indent with spaces, not tabs"
    elif "found ':'" in problem or "mapping values are not allowed" in problem:
        hint = "; quote a value that starts with or contains ': ', e.g. from: '::/0'"
    context = f" ({exc.context})" if exc.context else ""
    return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}{context}{hint}"


def parse_stack_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise StackError([StackIssue("(file)", _yaml_problem(exc))], source) from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise StackError([StackIssue("config", "a stack file is a mapping with a `config:` mapping inside")], source)
    return enclave_keys(document["config"], source)


def load_stack_file(path: Path, name: str | None = None) -> Stack:
    if not path.is_file():
        raise StackError([StackIssue("(file)", f"{path} does not exist")], str(path))
    values = parse_stack_yaml(path.read_text(), str(path))
    stack_name = name or stack_name_of(path)
    config = load_config(values, str(path))
    issues = droplet_name_issues(stack_name, config)  # as `pulumi up` checks them for this stack name
    if issues:
        raise StackError(issues, str(path))
    return Stack(stack_name, config, path)


def load_stack(name: str, root: Path | None = None) -> Stack:
    path = stack_path(name, root)
    if not path.is_file():
        known = sorted(stack_name_of(p) for p in path.parent.glob("Pulumi.*.yaml"))
        raise StackError(
            [StackIssue("--stack", f"no stack {name!r}: {path} does not exist; known stacks: {', '.join(known) or 'none'}")],
            str(path),
        )
    return load_stack_file(path, name)

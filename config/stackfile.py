"""Reading `stacks/Pulumi.<stack>.yaml` outside Pulumi (CLI, lab, tests), with the same checks as the program.

For users: docs/stack-file.md (YAML read as Pulumi reads it, the file-size limits).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .schema import StackConfig, StackError, StackIssue, enclave_keys, load_config, stack_name_issues
from .deployable import plaintext_secret_issues

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


# Bounds checked before (size) and while (nesting, alias expansion) a stack file is parsed, so no input can
# exhaust memory or the interpreter's stack. A real stack is a few KB, 7 levels deep, a few hundred nodes.
MAX_STACK_FILE_BYTES = 1 << 20  # 1 MiB
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000  # counting every alias as the whole subtree it stands for


@dataclass(frozen=True)
class VersionDependent:
    """A plain scalar YAML 1.1 and YAML 1.2 read differently (`0443`, `20:21`, `yes`, `1:00`, `1_000`…).

    Pulumi reads stack files with Go's yaml.v3 (YAML 1.2 with a few 1.1 leftovers: `0443` is octal 291 there,
    `1_000` is 1000); PyYAML reads YAML 1.1. Such a scalar is kept as this marker and refused by
    `parse_stack_yaml`, naming the key and the plain spelling."""

    text: str
    meaning: str  # what the readers make of it
    fix: str


# (kind, pattern, what YAML 1.1 / yaml.v3 / YAML 1.2 make of it, the plain spelling), checked in order.
_VERSION_DEPENDENT: list[tuple[str, re.Pattern[str], str, str]] = [
    (
        "bool",
        re.compile(r"y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF"),
        "true or false in YAML 1.1, text in YAML 1.2 (Pulumi)",
        "write true or false, or quote it ('{text}') if you mean the word",
    ),
    (
        "base60",
        re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?"),
        "a base-60 number in YAML 1.1 ({sexagesimal}), text in YAML 1.2 (Pulumi)",
        "write a port range as tcp/{low}-{high}, a number as {sexagesimal}, or quote it ('{text}')",
    ),
    (
        "octal",
        re.compile(r"[-+]?0[0-9_]+"),
        "octal in YAML 1.1 and in Pulumi's yaml.v3 ({octal}), decimal {decimal} in YAML 1.2",
        "write {decimal} (no leading zero), or quote it ('{text}')",
    ),
    (
        "number",
        re.compile(r"[-+]?(0b[01_]+|0o[0-7_]+|[0-9][0-9_]*_[0-9_]*)"),
        "a number in some YAML versions and text in others",
        "write it in plain decimal digits, or quote it ('{text}')",
    ),
    (
        "date",
        re.compile(r"[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?([Tt ].*)?"),
        "a date in YAML 1.1, text in YAML 1.2",
        "quote it ('{text}')",
    ),
]


def _version_dependent(text: str) -> VersionDependent | None:
    for kind, pattern, meaning, fix in _VERSION_DEPENDENT:
        if not pattern.fullmatch(text):
            continue
        values: dict[str, object] = {"text": text}
        digits = text.replace("_", "").lstrip("+-")
        if kind == "base60":
            whole = digits.split(".")[0].split(":")
            sexagesimal = 0
            for part in whole:
                sexagesimal = sexagesimal * 60 + int(part)
            values.update(low=int(whole[0]), high=int(whole[1]), sexagesimal=sexagesimal)
            if int(whole[1]) < int(whole[0]) or len(whole) > 2:  # not a port range: only the number makes sense
                fix = "write it as the number {sexagesimal}, or quote it ('{text}')"
        elif kind == "octal":
            values.update(decimal=int(digits))
            if set(digits) <= set("01234567"):
                values.update(octal=int(digits, 8))
            else:  # 0999: no octal; yaml.v3 falls back to a float, YAML 1.1 to text
                meaning = "text in YAML 1.1, the number {decimal} in YAML 1.2 and in Pulumi's yaml.v3"
        return VersionDependent(text, meaning.format(**values), fix.format(**values))
    return None


_VERSION_DEPENDENT_TAG = "tag:enclave,2026:yaml-version-dependent"


class _StackLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading plain scalars as YAML 1.2's core schema does (as Pulumi's yaml.v3 does):
    `true`/`false` are booleans, `20:21` and `yes` are text, numbers are decimal, `0x1F` is hex and `.inf` a
    float. A scalar the YAML versions disagree on is a `VersionDependent` marker, refused with its key.

    It also refuses a key written twice in one mapping (PyYAML keeps the last one silently, so a role pasted
    twice under one name would vanish; yaml.v3 refuses duplicates too), nesting deeper than MAX_YAML_DEPTH and
    aliases expanding to more than MAX_YAML_NODES nodes (an alias bomb)."""

    yaml_implicit_resolvers: dict[Any, Any] = {}

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels; a stack file needs about 7",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then `count: 2` overrides on purpose
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool, VersionDependent)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping (first on line {seen[key] + 1}); "
                    "keep one, or rename the second", key_node.start_mark,
                )
            if isinstance(key, (str, int, float, bool, VersionDependent)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_version_dependent(self, node: yaml.ScalarNode) -> VersionDependent:
        text = self.construct_scalar(node)
        marker = _version_dependent(str(text))
        assert marker is not None  # the resolver matched it
        return marker


def _resolver(tag: str, pattern: str, first: str | list[str]) -> None:
    _StackLoader.add_implicit_resolver(tag, re.compile(pattern, re.X), list(first))


# YAML 1.2 core schema, as yaml.v3 resolves it (the version-dependent spellings come first, so they win).
_resolver(
    _VERSION_DEPENDENT_TAG,
    r"""^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?
    |[-+]?0[0-9_]+
    |[-+]?(?:0b[01_]+|0o[0-7_]+|[0-9][0-9_]*_[0-9_]*)
    |[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt\ ].*)?)$""",
    "yYnNoO-+0123456789",
)
_resolver("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
_resolver("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""])
_resolver("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$", "-+0123456789")
_resolver(
    "tag:yaml.org,2002:float",
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
    "-+0123456789.",
)
_resolver("tag:yaml.org,2002:merge", r"^(?:<<)$", "<")
_StackLoader.add_constructor(_VERSION_DEPENDENT_TAG, _StackLoader.construct_version_dependent)


def _construct_int(loader: _StackLoader, node: yaml.ScalarNode) -> int:
    return int(str(loader.construct_scalar(node)), 0)  # decimal, or 0x hex (the resolver allows nothing else)


_StackLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

def _construct_float(loader: _StackLoader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    return float("nan") if text == ".nan" else float(text)


_StackLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(nodes, depth) of the document with every alias expanded, in time linear in the composed graph.

    Composed nodes form a DAG (an alias is the anchored node itself), so sizes are summed once per node; an
    alias to a node that contains it would be infinite and counts as over every bound."""
    size: dict[int, tuple[int, int]] = {}
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    over = (MAX_YAML_NODES + 1, MAX_YAML_DEPTH + 1)
    while pending:
        node, children_done = pending.pop()
        if id(node) in size:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not children_done:
            if id(node) in open_nodes:
                return over  # a cycle
            open_nodes.add(id(node))
            pending.append((node, True))
            for child in children:
                if id(child) in open_nodes and id(child) not in size:
                    return over
                pending.append((child, False))
            continue
        open_nodes.discard(id(node))
        nodes = 1 + sum(size[id(c)][0] for c in children)
        depth = 1 + max((size[id(c)][1] for c in children), default=0)
        size[id(node)] = (min(nodes, over[0]), min(depth, over[1]))
    return size[id(root)]


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


PLAIN_TYPES = (dict, list, str, int, float, bool, type(None))


def _key_path(parent: str, key: object) -> str:
    if not parent:
        return str(key)
    return f"{parent}.{key}"


def _unreadable_values(document: Any, prefix: str) -> list[StackIssue]:
    """Every version-dependent scalar and every value of an explicit YAML type (`!!binary`, `!!set`, a date…)
    Pulumi would read differently, each named by its key; the document is bounded, so the walk is too."""
    issues: list[StackIssue] = []
    pending: list[tuple[str, Any]] = [(prefix, document)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, VersionDependent):
            issues.append(StackIssue(path or "(file)", f"{value.text!r} is {value.meaning}; {value.fix}"))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if isinstance(key, VersionDependent):
                    issues.append(StackIssue(_key_path(path, key.text), f"the key {key.text!r} is {key.meaning}; quote it"))
                    continue
                pending.append((_key_path(path, key), item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        elif not isinstance(value, PLAIN_TYPES):
            issues.append(
                StackIssue(path or "(file)", f"a YAML {type(value).__name__} is not a stack value; write plain text, a number, "
                           "true/false, a list or a mapping (no !!tags)")
            )
    return issues  # in document order: children are pushed last-first


def parse_stack_yaml(text: str, source: str) -> dict[str, Any]:
    """The `enclave:` keys of a stack file's text, read as Pulumi reads them, or StackError naming each key."""
    if len(text) > MAX_STACK_FILE_BYTES:
        raise StackError([StackIssue("(file)", f"{len(text)} characters; a stack file is at most "
                                     f"{MAX_STACK_FILE_BYTES} (a real one is a few KB)")], source)
    loader = None
    try:
        loader = _StackLoader(text)  # the reader refuses unprintable characters here already
        node = loader.get_single_node()
        if node is not None:
            nodes, depth = _expanded_size(node)
            if nodes > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
                raise StackError([StackIssue("(file)", (
                    f"its aliases (*name) expand to more than {MAX_YAML_NODES} values or {MAX_YAML_DEPTH} levels "
                    "(or an alias refers to the mapping it is in); write the values out, or alias less"
                ))], source)
        document = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise StackError([StackIssue("(file)", _yaml_problem(exc))], source) from None
    except RecursionError:  # not reachable within MAX_YAML_DEPTH; kept so no input can print a traceback
        raise StackError([StackIssue("(file)", "nested too deeply; a stack file needs about 7 levels")], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise StackError([StackIssue("config", "a stack file is a mapping with a `config:` mapping inside")], source)
    # a secret in clear text is refused by every reader of the file (plan, lab, program): it is committed
    issues = _unreadable_values(document["config"], "") + plaintext_secret_issues(document["config"])
    if issues:
        raise StackError(issues, source)
    return enclave_keys(document["config"], source)


def _shown_path(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 200 else f"{text[:120]}… ({len(text)} characters)"


def read_bounded_text(path: Path, flag: str, limit: int, kind: str, example: str) -> str:
    """A file's UTF-8 text, at most `limit` bytes, or StackError saying what the path is instead (missing, a
    directory, a device, too big, not UTF-8). `kind` and `example` word the fix ("stack file", "stacks/…")."""
    shown = _shown_path(path)

    def refuse(message: str) -> StackError:
        return StackError([StackIssue(flag, message)], shown)

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise refuse(f"{shown} does not exist") from None
    except (OSError, ValueError) as exc:  # a name too long, a loop of links, no permission on a parent, a NUL…
        raise refuse(f"cannot read {shown}: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(mode):
        inside = sorted(p.name for p in path.glob("Pulumi.*.yaml"))[:5] if kind == "stack file" else []
        hint = f"; it holds {', '.join(inside)}" if inside else ""
        raise refuse(f"{shown} is a directory, not a {kind}{hint}; give a file, e.g. {example}")
    if not stat.S_ISREG(mode):
        raise refuse(f"{shown} is not a regular file (a device, a pipe or a socket); give a {kind}, e.g. {example}")
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise refuse(f"cannot read {shown}: {exc.strerror}") from None
    if len(data) > limit:
        raise refuse(f"{shown} is over {limit} bytes, more than a {kind} needs")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"{shown} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                     "save it as UTF-8") from None


def read_stack_text(path: Path, flag: str = "(file)") -> str:
    return read_bounded_text(path, flag, MAX_STACK_FILE_BYTES, "stack file", "stacks/Pulumi.prod.yaml")


def load_stack_file(path: Path, name: str | None = None, flag: str = "(file)") -> Stack:
    text = read_stack_text(path, flag)
    source = _shown_path(path)
    stack_name = name if name is not None else stack_name_of(path)
    name_issues = stack_name_issues(stack_name, None, "(stack name, from the file name)" if name is None else "--stack")
    if name_issues:
        raise StackError(name_issues, source)
    values = parse_stack_yaml(text, source)
    config = load_config(values, source)
    issues = stack_name_issues(stack_name, config)  # droplet names, as `pulumi up` checks them for this stack name
    if issues:
        raise StackError(issues, source)
    return Stack(stack_name, config, path)


def stack_file_issues(name: str, root: Path | None = None) -> list[StackIssue]:
    """For the Pulumi program: what `enclave plan` refuses in `stacks/Pulumi.<name>.yaml` as written (values YAML
    versions read differently, aliases, nesting), which the program cannot see in the values Pulumi hands it
    (`0443` arrives as 291). [] when there is no such file (a stack configured elsewhere)."""
    path = stack_path(name, root)
    if not path.is_file():
        return []
    try:
        parse_stack_yaml(read_stack_text(path), str(path))
    except StackError as exc:
        return exc.issues
    return []


def load_stack(name: str, root: Path | None = None) -> Stack:
    issues = stack_name_issues(name, None, "--stack")
    if issues:  # checked before it becomes a path: `--stack ../x` or `--stack ''` name no stack file
        raise StackError(issues, f"--stack {name!r}")
    path = stack_path(name, root)
    if not os.path.exists(path):
        known = sorted(stack_name_of(p) for p in path.parent.glob("Pulumi.*.yaml"))
        raise StackError(
            [StackIssue("--stack", f"no stack {name!r}: {path} does not exist; known stacks: {', '.join(known) or 'none'}")],
            str(path),
        )
    return load_stack_file(path, name)

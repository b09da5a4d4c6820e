"""Issue 12, property-based: whatever stack file and command line a user writes, `enclave` answers with exit 0,
1 or 2 and a message, never a traceback, within bounded time and memory.

Hypothesis generates stack documents from prod with parts replaced by generated values: text in any script,
YAML 1.1 scalars (`yes`, `0443`, `20:21`, `1:00`, `1_000`…), explicit tags, deep nesting, anchors, aliases and
alias bombs, and files that are not UTF-8; and command lines around them (`plan`, `diagram`, `ssh-config` with
generated flags, `--addresses` files, `--diff-from`). Each runs in `tests/cli_worker.py`, a subprocess with a
2 GiB address-space limit: a memory blow-up is a failed example, not a dead test run. The per-example deadline
(60 s) only catches hangs; it asserts no speed.

`make fuzz` runs it with a longer budget (ENCLAVE_FUZZ_EXAMPLES, default 2 000 there, 60 in `make test`).
`lab` is left out on purpose: a valid stack would build a real lab; its stack loading is `plan`'s
(tests/unit/test_schema.py::test_lab_refuses_bad_input_like_plan).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ..conftest import ROOT, stack_document

EXAMPLES = int(os.environ.get("ENCLAVE_FUZZ_EXAMPLES", "60"))
DEADLINE_S = 60.0
MEMORY_LIMIT_MB = 2048


# ------------------------------------------------------------------------------------------ the worker


class Worker:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_worker"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, encoding="utf-8",
        )
        assert self.read(120.0) == {"ready": True}

    def read(self, timeout: float) -> Any:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"no answer within {timeout} s: a hang"
        line = self.process.stdout.readline()
        assert line, f"the worker died (exit {self.process.wait()}): out of memory or a crash"
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd)}) + "\n")
        self.process.stdin.flush()
        return dict(self.read(DEADLINE_S))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


# ------------------------------------------------------------------------------------ stack documents


@dataclass(frozen=True)
class Raw:
    """A scalar written into the YAML text exactly as is (unquoted), so YAML itself decides what it means."""

    text: str


YAML_11_SCALARS = [
    "yes", "no", "on", "off", "y", "n", "Yes", "OFF", "0443", "0999", "20:21", "1:00", "190:20:30", "0x1F", ".inf",
    "-.inf", ".nan", "1_000", "0b101", "0o17", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "~", "null", "true",
    "false", "True", "1e3", "1.5", "-1", "0", "65536", "65537", "99999999999999999999", "=", "<<",
]
WORDS = [
    "tcp/80", "udp/53", "icmp", "tcp/1-65535", "tcp/0", "80,443", "::/0", "0.0.0.0/0", "::ffff:1.2.3.0/120",
    "127.0.0.1/32", "fe80::/10", "224.0.0.0/4", "169.254.0.0/16", "10.110.16.0/24", "10.110.16.0/28",
    "203.0.113.0/24", "2001:db8::/32", "internet", "operators", "neighbor", "all", "wordpress", "mysql", "mysql-1",
    "mysql-01", "mysql-9", "mysql-\u0661", "db-\u00b2", "app-\u0967", "tunnel", "lo", "eth0", "eth1", "restricted",
    "open", "allow", "deny", "operators6", "abcdefghijklmnopqrst", "abcdefghijkl-dd65ee",
]
TAGGED = ["!!binary aGVsbG8=", "!!python/object/apply:os.system ['true']", "!!set {a, b}", "!!timestamp 2001-12-14",
          "!!str 0443", "!!int 12", "!!float 1", "!custom x", "*nowhere"]

any_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=24)
leaf = st.one_of(
    st.sampled_from(YAML_11_SCALARS).map(Raw),
    st.sampled_from(TAGGED).map(Raw),
    st.sampled_from(WORDS),
    any_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.integers(min_value=1, max_value=400).map(lambda depth: Raw("[" * depth + "]" * depth)),
)
values = st.recursive(
    leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(WORDS) | any_text, children, max_size=4),
    max_leaves=12,
)


def emit(value: Any) -> str:
    """Flow-style YAML: JSON-quoted strings (valid YAML), Raw scalars verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{emit(k)}: {emit(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(emit(v) for v in value) + "]"
    if isinstance(value, float) and value != value:
        return ".nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    return json.dumps(value, ensure_ascii=False)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, (*prefix, i))


def replace(document: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        return {k: (replace(v, rest, new) if k == head else v) for k, v in document.items()}
    return [replace(v, rest, new) if i == head else v for i, v in enumerate(document)]


ALIAS_BOMB = ["b0: &b0 [x, x, x, x, x, x, x, x, x, x]"] + [
    f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 9)
]


@st.composite
def stack_files(draw: st.DrawFn) -> bytes:
    config: Any = stack_document(draw(st.sampled_from(["prod", "dev", "private"])))["config"]
    prelude: list[str] = []
    anchors = draw(st.lists(values, max_size=2))
    for i, anchored in enumerate(anchors):
        prelude.append(f"a{i}: &a{i} {emit(anchored)}")
    if draw(st.booleans()) and draw(st.booleans()):
        prelude += ALIAS_BOMB
    aliases = [Raw(f"*a{i}") for i in range(len(anchors))] + ([Raw("*b8")] if len(prelude) > len(anchors) else [])
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3, 4]))):  # a third of the files stay close to valid
        where = draw(st.sampled_from(list(paths(config))[1:]))
        use_alias = bool(aliases) and draw(st.booleans())
        new: Any = draw(st.sampled_from(aliases)) if use_alias else draw(values)
        if draw(st.booleans()) and isinstance(config, dict):
            config = {**config, draw(st.sampled_from(["enclave:" + w for w in WORDS[:6]]) | any_text): new}
        else:
            config = replace(config, where, new)
    text = "\n".join([*prelude, "config: " + emit(config), ""])
    data = text.encode("utf-8")
    damage = draw(st.sampled_from(["none"] * 12 + ["latin1", "bom", "nul", "truncate"]))
    if damage == "latin1":
        data = data.replace(b"ams3", b"ams\xe9", 1) + b"# caf\xe9\n"
    elif damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "nul":
        data = data[: len(data) // 2] + b"\x00" + data[len(data) // 2 :]
    elif damage == "truncate":
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return data


def example_addresses_json(stack: str) -> bytes:
    from config.stackfile import load_stack
    from enclave.compiler import compile_policy
    from enclave.plan import example_addresses

    policy = compile_policy(load_stack(stack).config)
    return json.dumps({host: vars(a) for host, a in example_addresses(policy).items()}).encode()


addresses_files = st.one_of(
    st.sampled_from(["prod", "dev", "private"]).map(example_addresses_json),
    st.recursive(st.none() | st.booleans() | st.integers() | any_text | st.sampled_from(WORDS),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(any_text | st.sampled_from(WORDS), c, max_size=3),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=100_000).map(lambda d: ("[" * d + "]" * d).encode()),
    st.just(b'{"mysql-1": {"public": "\xff"}}'),
)

# argv text as a shell hands it over: any characters but NUL, and undecodable bytes as surrogate escapes
argv_text = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00") | st.sampled_from(["\udcff", "\udc80"]),
            max_size=30),
    st.sampled_from(WORDS + ["", "-", "--", "prod", "dev", "My_Stack", "a b", "x\nHost *", "x" * 100_000]),
)


@st.composite
def command_lines(draw: st.DrawFn, folder: Path) -> list[str]:
    files = 0

    def write(data: bytes, suffix: str) -> str:
        nonlocal files
        files += 1
        path = folder / f"Pulumi.f{files}{suffix}"
        path.write_bytes(data)
        return str(path)

    command = draw(st.sampled_from(["plan", "plan", "diagram", "ssh-config"]))
    argv = [command]
    source = draw(st.sampled_from(["file", "file", "file", "name", "path", "none"]))
    if source == "file":
        argv += ["--stack-file", write(draw(stack_files()), ".yaml")]
    elif source == "name":
        argv += ["--stack", draw(argv_text)]
    elif source == "path":
        argv += ["--stack-file", draw(st.sampled_from(["", "/dev/null", "/", str(folder), "missing.yaml", "x" * 5000]))]
    if command != "diagram" and draw(st.booleans()):
        argv += ["--addresses", write(draw(addresses_files), ".json")]
    if command == "plan":
        if draw(st.booleans()):
            argv += ["--host", draw(argv_text | st.sampled_from(["mysql-1", "tunnel-1", "wordpress-2"]))]
        if draw(st.booleans()):
            argv += ["--format", draw(st.sampled_from(["json", "text", "yaml"]))]
        if draw(st.booleans()):
            argv += ["--diff-from", write(draw(stack_files()), ".yaml")]
    elif command == "diagram":
        # inside the example's folder only: a generated absolute path must not write next to a system file
        output = draw(st.sampled_from(["empty", "device", "dir/", "dir", "name", "default"]))
        if output == "name":
            name = draw(argv_text.filter(lambda t: "/" not in t and t not in ("", ".", "..")))
            argv += ["--output", str(folder / name)]
        elif output != "default":
            argv += ["--output", {"empty": "", "device": "/dev/null", "dir/": f"{folder}/", "dir": str(folder)}[output]]
    elif draw(st.booleans()):
        argv += ["--identity-file", draw(argv_text)]
    return argv


@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_command_line_exits_0_1_or_2_without_a_traceback(worker: Worker, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="enclave-fuzz-") as folder:
        argv = data.draw(command_lines(Path(folder)), label="argv")
        answer = worker.run(argv, Path(folder))
    shown = [a if len(a) < 200 else a[:200] + "…" for a in argv]
    event(f"{argv[0]} exit {answer['code']}")  # `pytest --hypothesis-show-statistics` shows the mix
    assert answer["exception"] is None, f"{shown}: {answer['exception']}"
    assert answer["code"] in (0, 1, 2), f"{shown}: exit {answer['code']}\n{answer['stderr']}"
    assert "Traceback" not in answer["stderr"] + answer["stdout"], shown
    if answer["code"] == 2:
        assert answer["stderr"].strip(), f"{shown}: exit 2 without a message"
    assert answer["max_rss_mb"] < MEMORY_LIMIT_MB

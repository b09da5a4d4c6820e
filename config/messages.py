"""pydantic's validation errors, said in the stack file's own words: each becomes a StackIssue whose path is the
key a user edits (`enclave:roles.mysql.ingress[0].from`, camelCase as written, not pydantic's `loc`) and whose
message names the shape to write, not a Python type, with a did-you-mean for a misspelt key or word.

For users: docs/stack-file.md (what is refused, and how it is reported).
"""

from __future__ import annotations

from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from .issues import NAMESPACE, StackIssue
from .ports import PortSpec
from .suggest import did_you_mean


def validation_issues(error: ValidationError, root: type[BaseModel]) -> list[StackIssue]:
    """One StackIssue per error pydantic found validating `root` (the stack's model)."""
    return [
        StackIssue(NAMESPACE + ":" + _path(tuple(err["loc"])), _friendly(dict(err), root)) for err in error.errors()
    ]


def _what(value: object) -> str:
    """How a YAML value reads back to its author: `ingress:` left empty is nothing, not 'None'."""
    if value is None:
        return "nothing (the key is left empty)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _looks_like_port(key: object) -> bool:
    try:
        PortSpec.parse(key)
    except ValueError:
        return False
    return True


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The model whose key `loc` ends in (for did-you-mean on an unknown key), following fields, lists and maps
    from `root`."""
    annotation: Any = root
    for part in loc[:-1]:
        while True:  # unwrap Annotated, Optional/Union (the egress allowlist) to the model or container inside
            origin = get_origin(annotation)
            if origin is Annotated:
                annotation = get_args(annotation)[0]
            elif origin is Union:
                args = [a for a in get_args(annotation) if get_origin(a) in (list, dict, Annotated) or _is_model(a)]
                if not args:
                    return None
                annotation = args[-1]
            else:
                break
        if _is_model(annotation) and isinstance(part, str):
            field = next((f for name, f in annotation.model_fields.items() if part in (name, f.alias)), None)
            if field is None:
                continue  # a tag of a union (`allowlist`)
            annotation = field.annotation
        elif get_origin(annotation) is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif isinstance(part, str) and part in ("allowlist", "word"):
            continue
        else:
            return None
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation if _is_model(annotation) else None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _friendly(error: dict[str, Any], root: type[BaseModel]) -> str:
    kind = error["type"]
    value = error.get("input")
    context = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = error["loc"][-1]
        if _looks_like_port(key):
            # `{from: wordpress, ports: tcp/3306, tcp/33060}`: YAML reads the second port as a key
            return f"unknown key {key!r}: a port? several ports are one list, e.g. ports: [tcp/3306, tcp/33060]"
        owner = _model_at(tuple(error["loc"]), root)
        known = _keys_of(owner) if owner is not None else []
        hint = did_you_mean(str(key), known)
        listed = f" (known keys here: {', '.join(known)})" if known and not hint else ""
        return f"unknown key {key!r}{hint or '; check its spelling'}{listed}"
    if kind == "missing":
        return "required key is missing"
    # pydantic's wording names Python types; say it in the stack file's terms, with the shape to write
    if kind == "list_type":
        return f"should be a list ([a, b], or one `- item` per line), not {_what(value)}"
    if kind in ("dict_type", "model_type"):
        return f"should be a mapping ({{key: value, …}}, or one `key: value` per line), not {_what(value)}"
    if kind == "too_short" and not value:
        return "is empty; give at least 1 item"
    if kind == "too_long":
        actual = len(value) if isinstance(value, (list, dict)) else context.get("actual_length")
        return f"has {actual} items, over the limit of {context.get('max_length')} (docs/stack-file.md: Limits)"
    if kind == "string_type":
        return f"should be text, not {_what(value)}"
    if kind == "string_too_short":
        return "is empty; write a value"
    if kind == "literal_error":
        expected = context.get("expected", "")
        words = [w.strip(" '") for w in str(expected).replace(" or ", ",").split(",") if w.strip(" '")]
        hint = did_you_mean(str(value), words) if isinstance(value, str) else ""
        return f"{_what(value)} is not one of {', '.join(words)}{hint}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{_what(value)} is too small; the lowest allowed is {context.get('ge', context.get('gt'))}"
    if kind in ("less_than_equal", "less_than"):
        return f"{_what(value)} is too large; the highest allowed is {context.get('le', context.get('lt'))}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"should be a whole number, not {_what(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"should be true or false, not {_what(value)}"
    if kind.startswith(("ip_v4", "ip_v6", "ip_any")):
        return f"{_what(value)} is not an address range; e.g. 198.51.100.7/32"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"{_what(value)} is not open, restricted or a list of {{to, ports}} entries"
    message = str(error["msg"]).removeprefix("Value error, ")
    # any other wording of the validation library, put in the stack's terms
    return message.replace("Input should be", "should be").replace("Input", "the value")


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = {"sources": "from"}.get(part, to_camel(part) if "_" in part else part)
            if name.startswith("[") or name in ("function-after", "function-before", "allowlist", "word"):
                continue
            out += ("." if out else "") + name
    return out

"""Reading AlignmentRun files, with every error pointing at its file, line and field.

`load_run(path)` returns the validated model or raises `SpecError`, whose `.errors` are
`(line, field path, message)` for everything wrong at once (not just the first problem).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .graph import GraphError, dependencies
from .spec import AlignmentRun


@dataclass
class SpecError(Exception):
    file: str
    errors: list[tuple[int | None, str, str]]

    def __str__(self) -> str:
        return "\n".join(f"{self.file}:{line or '?'}: {path}: {msg}" for line, path, msg in self.errors)


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _line_index(root: yaml.Node | None) -> dict[tuple, int]:
    """Maps each key path (('spec', 'stages', 'dpo', 'beta')) to its 1-based line."""
    index: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                index[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return index


def _bare_boolean_keys(node: yaml.Node | None, path: tuple = ()) -> list[tuple[int, str, str]]:
    """Keys written as a bare y/Y/n/N (bestOfN's `n`): a string here, but the boolean of YAML 1.1
    for kubectl and Helm (sigs.k8s.io/yaml), so the API server would see another field."""
    out: list[tuple[int, str, str]] = []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.style is None and k.value in ("y", "Y", "n", "N"):
                meaning = "false" if k.value in "nN" else "true"
                out.append((k.start_mark.line + 1, _dotted(path + (k.value,)),
                            f'write the key as "{k.value}" (quoted): kubectl and Helm read a bare {k.value} as {meaning}'))
            out += _bare_boolean_keys(v, path + (k.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _bare_boolean_keys(v, path + (i,))
    return out


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "required",
    "extra_forbidden": "unknown field",
    "string_pattern_mismatch": "must match {pattern}",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "literal_error": "must be one of {expected}",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
}


def _message(err: dict[str, Any]) -> str:
    template = _MESSAGES.get(err["type"])
    if template:
        try:
            ctx = {k: (int(v) if isinstance(v, float) and v.is_integer() else v)
                   for k, v in err.get("ctx", {}).items()}
            return template.format(**ctx)
        except (KeyError, IndexError):
            pass
    return err["msg"]


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _locate(index: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in index:
            return index[tuple(loc[:n])]
    return None


def _loc_of_path(path: str) -> tuple:
    parts: list[Any] = []
    for piece in path.replace("]", "").split("."):
        name, *idx = piece.split("[")
        parts.append(name)
        parts.extend(int(i) for i in idx)
    return tuple(parts)


def parse_run(text: str, file: str = "<string>", for_kubectl: bool = False) -> AlignmentRun:
    """Validate the YAML text of one AlignmentRun; raise SpecError naming every problem.
    for_kubectl: also refuse what kubectl and Helm would read otherwise (a bare y/n key)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SpecError(file, [(mark.line + 1 if mark else None, "<yaml>", str(getattr(e, "problem", e)))]) from None
    if not isinstance(data, dict):
        raise SpecError(file, [(1, "<document>", "must be a mapping with apiVersion, kind, metadata and spec")])
    root = _compose(text)
    index, errors = _line_index(root), (_bare_boolean_keys(root) if for_kubectl else [])
    try:
        run = AlignmentRun.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            if err["type"] == "cross_field":
                for path, msg in err["ctx"]["errors"]:
                    errors.append((_locate(index, _loc_of_path(path)), path, msg))
            else:
                errors.append((_locate(index, loc), _dotted(loc), _message(err)))
        raise SpecError(file, errors) from None
    if errors:
        raise SpecError(file, errors)
    try:
        dependencies(run.spec)
    except GraphError as e:
        raise SpecError(file, [(_locate(index, ("spec", "stages")), "spec.stages", str(e).split(": ", 1)[1])]) from None
    return run


def load_run(path: str | Path, for_kubectl: bool = False) -> AlignmentRun:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(str(p), [(None, "<file>", e.strerror or str(e))]) from None
    return parse_run(text, str(p), for_kubectl)

"""Selectors and patches as the API server applies them: label selectors (`a=b,c!=d,e,!f`),
field selectors (equality on dotted paths: `involvedObject.name=x`), RFC 7386 merge patches and
JSON pointers. Pure.
"""

from __future__ import annotations

import copy
import re
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (None deletes a key), without mutating `target`."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(doc: Any, path: str) -> Any:
    """The value at a JSON pointer, or a sentinel when absent."""
    for part in [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _ABSENT
    return doc


_ABSENT = object()


def parse_selector(text: str | None) -> list[tuple[str, str, str | None]]:
    """`a=b,c!=d,e,!f` -> [(op, key, value)]; set-based `in`/`notin` are not needed here."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in (text or "").split(","):
        term = raw.strip()
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            terms.append(("!=", k.strip(), v.strip()))
        elif "==" in term or "=" in term:
            k, v = term.split("==", 1) if "==" in term else term.split("=", 1)
            terms.append(("=", k.strip(), v.strip()))
        elif term.startswith("!"):
            terms.append(("!", term[1:].strip(), None))
        else:
            terms.append(("exists", term, None))
    return terms


def selector_matches(terms: list[tuple[str, str, str | None]], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    for op, key, value in terms:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!" and key in labels:
            return False
    return True


def field_selector_matches(text: str | None, obj: dict) -> bool:
    for term in (text or "").split(","):
        if not term.strip():
            continue
        negate = "!=" in term
        key, value = re.split(r"!=|==|=", term, maxsplit=1)
        actual = obj
        for part in key.strip().split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if (str(actual) if actual is not None else "") == value.strip():
            if negate:
                return False
        elif not negate:
            return False
    return True

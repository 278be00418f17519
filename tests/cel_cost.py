"""The worst-case cost of a CRD's CEL `x-kubernetes-validations` rules, estimated as the
Kubernetes API server estimates it when the CRD is created, so a test can tell whether a real
server would accept the CRD. A test tool: pure, no cluster.

What it reproduces (cel-go checker/cost.go; apiserver pkg/cel/common/schemas.go; apiextensions'
per-rule and per-CRD checks):
* sizes from the schema: a string's `maxLength` x 4 (bytes per code point), else its longest
  `enum` value, else 3 MiB - 2; a list's `maxItems`, else (3 MiB - 2) / (min item size + 1); a
  map's `maxProperties`, else (3 MiB - 2) / (min value size + 6); a scalar field 0, a literal or
  computed scalar 1;
* costs: identifier and field selection 1 each (a select on an object or map), literals 0, a
  list literal 10 plus its items, `has()` its operand's cost (presence itself 0, as Kubernetes
  since 1.29 sets), `!`, `size` and numeric comparisons 1 plus their arguments, `&&`/`||` both
  sides, `?:` the condition plus the dearer branch, `==`/`!=`/string ordering
  ceil(0.1 x the smaller size), `in` on a list its size, `contains` ceil(0.1 x target) x
  ceil(0.1 x argument), `startsWith`/`endsWith` ceil(0.1 x argument), `matches`
  ceil(0.1 x (target + 1)) x ceil(0.25 x regex), `all`/`exists` over a list or map: the range
  plus size x (loop condition (2 for all, 3 for exists) + 1 + the predicate) + 1;
* a rule's cost times its cardinality (the product of the bounds of the lists and maps above
  it), against StaticEstimatedCostLimit per rule and StaticEstimatedCRDCostLimit in all.

Anything else (indexing, arithmetic, other functions and macros, `oldSelf`,
`messageExpression`, string formats, equality of lists or objects) raises `UnsupportedCel`:
a rule this module cannot price fails its test instead of passing unpriced.
"""

from __future__ import annotations

import ast as pyast
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

MAX_REQUEST = 3 * 1024 * 1024            # apiserver pkg/apis/cel MaxRequestSizeBytes
PER_RULE_LIMIT = 10_000_000              # apiextensions validation.StaticEstimatedCostLimit
CRD_LIMIT = 100_000_000                  # apiextensions validation.StaticEstimatedCRDCostLimit
STRING_TRAVERSAL = 0.1                   # cel-go common.StringTraversalCostFactor
REGEX_LENGTH = 0.25                      # cel-go common.RegexStringLengthCostFactor
LIST_CREATE = 10                         # cel-go common.ListCreateBaseCost
PRESENCE_TEST = 0                        # checker.PresenceTestHasCost(false) in Kubernetes' env
_MIN_SIZE = {"string": 2, "boolean": 4, "integer": 1, "number": 1, "array": 2}  # MinStringSize, ...


class UnsupportedCel(Exception):
    """A rule uses something this estimator does not price."""


@dataclass(frozen=True)
class Typ:
    kind: str                      # object, map, list, string, int, double, bool, null
    size: int = 0                  # the largest size (characters, items, properties)
    schema: dict | None = None     # an object's schema (its properties)
    elem: "Typ | None" = None      # a list's items or a map's values


@dataclass(frozen=True)
class RuleCost:
    path: str          # the schema node the rule sits on ('' = the root given)
    rule: str
    cost: int          # one evaluation, worst case
    cardinality: int   # evaluations per object at most
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.cost * self.cardinality)


def _ceil(x: float) -> int:
    return int(math.ceil(x))


def min_size(schema: dict) -> int:
    """The smallest serialized size of a value of `schema` (apiserver's MinSerializedSize)."""
    kind = schema.get("type")
    if kind == "object":
        if isinstance(schema.get("additionalProperties"), dict):
            return 2
        required = set(schema.get("required", []))
        return 2 + sum(len(name) + min_size(prop) + 4 for name, prop in schema.get("properties", {}).items()
                       if name in required and "default" not in prop)
    if kind in _MIN_SIZE:
        return _MIN_SIZE[kind]
    raise UnsupportedCel(f"schema type {kind!r}")


def list_bound(schema: dict) -> int:
    return schema["maxItems"] if "maxItems" in schema else (MAX_REQUEST - 2) // (min_size(schema["items"]) + 1)


def map_bound(schema: dict) -> int:
    if "maxProperties" in schema:
        return schema["maxProperties"]
    return (MAX_REQUEST - 2) // (min_size(schema["additionalProperties"]) + 6)


def typ_of(schema: dict) -> Typ:
    """The CEL type and size bound of a value of `schema`."""
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format"):
            raise UnsupportedCel(f"string format {schema['format']!r}")
        if "maxLength" in schema:
            return Typ("string", schema["maxLength"] * 4)
        if schema.get("enum"):
            return Typ("string", max(len(v) for v in schema["enum"]))
        return Typ("string", MAX_REQUEST - 2)
    if kind == "array":
        return Typ("list", list_bound(schema), elem=typ_of(schema["items"]))
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return Typ("map", map_bound(schema), elem=typ_of(schema["additionalProperties"]))
    if kind == "object" and "properties" in schema:
        return Typ("object", schema=schema)
    scalar = {"integer": "int", "number": "double", "boolean": "bool"}.get(kind or "")
    if scalar:
        return Typ(scalar, 0)
    raise UnsupportedCel(f"schema type {kind!r}")


# --- the estimator, over cel-python's parse tree ----------------------------------------------


def _tree(node: Any) -> tuple[str, list]:
    return node.data, node.children


def _string_literal(token: str) -> str:
    text = token[1:] if token[:1] in "rR" else token
    if text[:1] in "bB":
        raise UnsupportedCel("bytes literal")
    return pyast.literal_eval(text) if token[:1] not in "rR" else text.strip("'\"")


class _Estimator:
    def __init__(self, root: Typ) -> None:
        self.scope: dict[str, Typ] = {"self": root}

    def cost(self, node: Any) -> tuple[int, Typ]:
        name, kids = _tree(node)
        handler = getattr(self, "_" + name, None)
        if handler is None:
            raise UnsupportedCel(name)
        return handler(kids)

    def _pass(self, kids: list) -> tuple[int, Typ]:
        if len(kids) != 1:
            raise UnsupportedCel("operator with several operands")
        return self.cost(kids[0])

    _addition = _multiplication = _member = _primary = _pass

    def _expr(self, kids: list) -> tuple[int, Typ]:
        if len(kids) == 1:
            return self.cost(kids[0])
        (c, _), (ct, tt), (cf, tf) = (self.cost(k) for k in kids)
        return c + max(ct, cf), _union(tt, tf)

    def _conditionalor(self, kids: list) -> tuple[int, Typ]:
        if len(kids) == 1:
            return self.cost(kids[0])
        return sum(self.cost(k)[0] for k in kids), Typ("bool", 1)

    _conditionaland = _conditionalor

    def _relation(self, kids: list) -> tuple[int, Typ]:
        if len(kids) == 1:
            return self.cost(kids[0])
        op, (rhs_cost, rhs) = _tree(kids[0])[0], self.cost(kids[1])
        lhs_cost, lhs = self.cost(_tree(kids[0])[1][0])
        args = lhs_cost + rhs_cost
        if op == "relation_in":
            if rhs.kind != "list":
                raise UnsupportedCel(f"'in' on {rhs.kind}")
            return rhs.size + args, Typ("bool", 1)
        if lhs.kind in ("int", "double") and rhs.kind in ("int", "double") and op not in ("relation_eq", "relation_ne"):
            return 1 + args, Typ("bool", 1)
        if {lhs.kind, rhs.kind} <= {"string", "int", "double", "bool", "null"}:
            return _ceil(STRING_TRAVERSAL * min(lhs.size, rhs.size)) + args, Typ("bool", 1)
        raise UnsupportedCel(f"{op} between {lhs.kind} and {rhs.kind}")

    def _unary(self, kids: list) -> tuple[int, Typ]:
        if len(kids) == 1:
            return self.cost(kids[0])
        if _tree(kids[0])[0] != "unary_not":
            raise UnsupportedCel(_tree(kids[0])[0])
        return 1 + self.cost(kids[1])[0], Typ("bool", 1)

    def _paren_expr(self, kids: list) -> tuple[int, Typ]:
        return self.cost(kids[0])

    def _ident(self, kids: list) -> tuple[int, Typ]:
        name = str(kids[0])
        if name in ("true", "false"):
            return 0, Typ("bool", 1)
        if name not in self.scope:
            raise UnsupportedCel(f"identifier {name!r}")
        return 1, self.scope[name]

    def _literal(self, kids: list) -> tuple[int, Typ]:
        token = kids[0]
        if token.type == "STRING_LIT":
            return 0, Typ("string", len(_string_literal(str(token))))
        kind = {"INT_LIT": "int", "UINT_LIT": "int", "FLOAT_LIT": "double", "BOOL_LIT": "bool", "NULL_LIT": "null"}
        if token.type not in kind:
            raise UnsupportedCel(token.type)
        return 0, Typ(kind[token.type], 1)

    def _list_lit(self, kids: list) -> tuple[int, Typ]:
        items = [self.cost(k) for k in (_tree(kids[0])[1] if kids else [])]
        elem = None
        for _, t in items:
            elem = t if elem is None else _union(elem, t)
        return LIST_CREATE + sum(c for c, _ in items), Typ("list", len(items), elem=elem)

    def _member_dot(self, kids: list) -> tuple[int, Typ]:
        operand_cost, operand = self.cost(kids[0])
        return operand_cost + 1, _field(operand, str(kids[1]))

    def _ident_arg(self, kids: list) -> tuple[int, Typ]:
        name, args = str(kids[0]), (_tree(kids[1])[1] if len(kids) > 1 else [])
        if name == "has" and len(args) == 1:
            inner = _unwrap(args[0])
            if _tree(inner)[0] != "member_dot":
                raise UnsupportedCel("has() of something other than a field")
            operand_cost, operand = self.cost(_tree(inner)[1][0])
            _field(operand, str(_tree(inner)[1][1]))
            return PRESENCE_TEST + operand_cost, Typ("bool", 1)
        if name == "size" and len(args) == 1:
            return 1 + self.cost(args[0])[0], Typ("int", 1)
        raise UnsupportedCel(f"function {name}()")

    def _member_dot_arg(self, kids: list) -> tuple[int, Typ]:
        name, args = str(kids[1]), (_tree(kids[2])[1] if len(kids) > 2 else [])
        if name in ("all", "exists") and len(args) == 2:
            return self._quantifier(name, kids[0], args)
        target_cost, target = self.cost(kids[0])
        priced = [self.cost(a) for a in args]
        arg_cost = sum(c for c, _ in priced)
        if name == "size" and not args:
            return target_cost + 1, Typ("int", 1)
        if target.kind != "string" or len(priced) != 1 or priced[0][1].kind != "string":
            raise UnsupportedCel(f"{target.kind}.{name}()")
        arg = priced[0][1]
        if name == "contains":
            own = _ceil(STRING_TRAVERSAL * target.size) * _ceil(STRING_TRAVERSAL * arg.size)
        elif name in ("startsWith", "endsWith"):
            own = _ceil(STRING_TRAVERSAL * arg.size)
        elif name == "matches":
            own = _ceil(STRING_TRAVERSAL * (target.size + 1)) * _ceil(REGEX_LENGTH * arg.size)
        else:
            raise UnsupportedCel(f"string.{name}()")
        return target_cost + arg_cost + own, Typ("bool", 1)

    def _quantifier(self, name: str, range_node: Any, args: list) -> tuple[int, Typ]:
        range_cost, rng = self.cost(range_node)
        if rng.kind not in ("list", "map"):
            raise UnsupportedCel(f"{name}() over {rng.kind}")
        var = _tree(_unwrap(args[0]))
        if var[0] != "ident":
            raise UnsupportedCel(f"{name}() variable")
        item = rng.elem if rng.kind == "list" else Typ("string", MAX_REQUEST - 2)  # a map's keys
        saved = self.scope.get(str(var[1][0]))
        self.scope[str(var[1][0])] = item
        try:
            predicate = self.cost(args[1])[0]
        finally:
            if saved is None:
                self.scope.pop(str(var[1][0]))
            else:
                self.scope[str(var[1][0])] = saved
        condition = 2 if name == "all" else 3    # @not_strictly_false(accu) / (!accu)
        step = 1 + predicate                       # accu && predicate / accu || predicate
        return range_cost + rng.size * (condition + step) + 1, Typ("bool", 1)


def _unwrap(node: Any) -> Any:
    """The innermost node of a chain of single-child wrappers (expr > ... > primary)."""
    while _tree(node)[0] in ("expr", "conditionalor", "conditionaland", "relation", "addition",
                             "multiplication", "unary", "member", "primary") and len(_tree(node)[1]) == 1:
        node = _tree(node)[1][0]
    return node


def _field(operand: Typ, name: str) -> Typ:
    if operand.kind == "map":
        return operand.elem
    if operand.kind != "object":
        raise UnsupportedCel(f"field {name!r} of a {operand.kind}")
    props = operand.schema.get("properties", {})
    if name not in props:
        raise UnsupportedCel(f"no field {name!r} in the schema (a compile error on the server)")
    return typ_of(props[name])


def _union(a: Typ, b: Typ) -> Typ:
    if a.kind != b.kind:
        raise UnsupportedCel(f"branches of types {a.kind} and {b.kind}")
    elem = a.elem if b.elem is None else b.elem if a.elem is None else _union(a.elem, b.elem)
    return Typ(a.kind, max(a.size, b.size), a.schema or b.schema, elem)


def estimate(rule: str, self_schema: dict) -> int:
    """One evaluation's worst-case cost of `rule` with `self` a value of `self_schema`."""
    from celpy.celparser import CELParser

    return _Estimator(typ_of(self_schema)).cost(CELParser().parse(rule))[0]


def _rules_at(schema: dict, path: str, cardinality: int) -> Iterator[RuleCost]:
    for rule in schema.get("x-kubernetes-validations", []):
        if set(rule) - {"rule", "message", "fieldPath", "reason"}:
            raise UnsupportedCel(f"rule keys {sorted(set(rule) - {'rule', 'message', 'fieldPath', 'reason'})}")
        yield RuleCost(path, rule["rule"], estimate(rule["rule"], schema), cardinality)
    for name, prop in schema.get("properties", {}).items():
        yield from _rules_at(prop, f"{path}.{name}", cardinality)
    if "items" in schema:
        yield from _rules_at(schema["items"], f"{path}[]", cardinality * list_bound(schema))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _rules_at(schema["additionalProperties"], f"{path}{{}}", cardinality * map_bound(schema))


def schema_nodes(schema: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """(path, node) of `schema` and every schema below it: properties `.name`, items `[]`, map
    values `{}`."""
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from schema_nodes(prop, f"{path}.{name}")
    if "items" in schema:
        yield from schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], f"{path}{{}}")


def rule_costs(schema: dict) -> list[RuleCost]:
    """Every CEL rule under `schema` (an openAPIV3Schema) with its cost and cardinality."""
    return list(_rules_at(schema, "", 1))

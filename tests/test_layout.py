"""The file's layout: banner sections in dependency order.

``autofocus.py`` reads top to bottom: every top-level definition uses only names defined in its
own section or in a section above it -- when it runs at import, inside its functions' bodies, and
in its annotations (never evaluated under ``from __future__ import annotations``, still a
dependency).  The preamble above the first banner (the docstring, the early signal handling and
the imports) is not checked.  The checker resolves names the way Python does: a parameter or a
local variable that shares a later global's name is not a use of it.
"""
from __future__ import annotations

import ast
import functools
import re

import pytest
from conftest import ROOT

BANNER = re.compile(r"# (\S.*?) #{3,}")
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def banner_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(1-based line, title) of each banner: ``# Title ####`` under a line of ``#####``."""
    return [(i + 1, m.group(1)) for i, text in enumerate(lines)
            if (m := BANNER.fullmatch(text)) and i > 0 and lines[i - 1].startswith("#####")]


def defined_names(node: ast.stmt) -> list[str]:
    """The module-level names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    targets = {ast.Assign: lambda n: n.targets, ast.AnnAssign: lambda n: [n.target],
               ast.AugAssign: lambda n: [n.target]}.get(type(node))
    if targets is None:
        return []
    return [sub.id for t in targets(node) for sub in ast.walk(t)
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store)]


def _bound_in(scope: ast.AST) -> set[str]:
    """Names local to a function, lambda, class or comprehension scope (Python's rules)."""
    names: set[str] = set()
    declared: set[str] = set()
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = scope.args
        names |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
        body = [scope.body] if isinstance(scope, ast.Lambda) else scope.body
    elif isinstance(scope, ast.ClassDef):
        body = scope.body
    else:  # a comprehension: its targets (the first iterable is evaluated outside)
        body = [g.target for g in scope.generators]
        body += [c for g in scope.generators for c in g.ifs]
        body += [scope.key, scope.value] if isinstance(scope, ast.DictComp) else [scope.elt]
        body += [g.iter for g in scope.generators[1:]]
    todo = list(body)
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
            todo += n.decorator_list + (n.bases + [k.value for k in n.keywords]
                                        if isinstance(n, ast.ClassDef) else _defaults(n.args))
            continue
        if isinstance(n, ast.Lambda):
            todo += _defaults(n.args)
            continue
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            todo.append(n.generators[0].iter)
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            declared |= set(n.names)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            names.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            names.add(n.rest)
        todo += ast.iter_child_nodes(n)
    return names - declared


def _defaults(args: ast.arguments) -> list[ast.AST]:
    return [d for d in args.defaults + args.kw_defaults if d is not None]


def global_uses(node: ast.stmt) -> set[str]:
    """Every module-level name a top-level statement refers to: when it runs, inside its
    functions' bodies, and in its annotations (also ones in quotes, never evaluated under
    ``from __future__ import annotations``, and a TypeVar's ``bound=``)."""
    found: set[str] = set()

    def resolve(name: str, scopes: list[tuple[bool, set[str]]]) -> None:
        for depth, (is_class, names) in enumerate(reversed(scopes)):
            if is_class and depth > 0:
                continue  # a class body's names are not visible inside its methods
            if name in names:
                return
        found.add(name)

    def annotation(expr: ast.AST | None, scopes: list) -> None:
        if expr is None:
            return
        for sub in ast.walk(expr):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                try:
                    annotation(ast.parse(sub.value, mode="eval").body, scopes)
                except SyntaxError:
                    pass
            elif isinstance(sub, ast.Name):
                resolve(sub.id, scopes)

    def visit(n: ast.AST, scopes: list[tuple[bool, set[str]]]) -> None:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = n.args
            for d in _defaults(a):
                visit(d, scopes)
            for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if x is not None:
                    annotation(x.annotation, scopes)
            inner = scopes + [(False, _bound_in(n))]
            if isinstance(n, ast.Lambda):
                visit(n.body, inner)
                return
            for d in n.decorator_list:
                visit(d, scopes)
            annotation(n.returns, scopes)
            for s in n.body:
                visit(s, inner)
            return
        if isinstance(n, ast.ClassDef):
            for d in n.decorator_list + n.bases + [k.value for k in n.keywords]:
                visit(d, scopes)
            inner = scopes + [(True, _bound_in(n))]
            for s in n.body:
                visit(s, inner)
            return
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            visit(n.generators[0].iter, scopes)
            inner = scopes + [(False, _bound_in(n))]
            for g in n.generators:
                visit(g.target, inner)
                for c in g.ifs:
                    visit(c, inner)
            for g in n.generators[1:]:
                visit(g.iter, inner)
            for e in ([n.key, n.value] if isinstance(n, ast.DictComp) else [n.elt]):
                visit(e, inner)
            return
        if isinstance(n, ast.AnnAssign):
            annotation(n.annotation, scopes)
            for sub in (n.target, n.value):
                if sub is not None:
                    visit(sub, scopes)
            return
        if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute)):
            callee = n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            if callee == "TypeVar":
                for k in n.keywords:
                    if k.arg == "bound":
                        annotation(k.value, scopes)
            elif callee == "cast" and n.args:
                annotation(n.args[0], scopes)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            resolve(n.id, scopes)
        for child in ast.iter_child_nodes(n):
            visit(child, scopes)

    visit(node, [])
    return found


def back_references(source: str) -> list[tuple[int, str, str, str, str]]:
    """(line, definition, its section, name used, that name's section) for every use of a name
    first defined in a later banner section than the top-level statement using it.  Statements
    before the first banner (the start-up preamble) are section 0 and are not checked."""
    lines = source.splitlines()
    banners = banner_lines(lines)
    titles = ["(preamble)"] + [title for _, title in banners]

    def section(lineno: int) -> int:
        return sum(1 for b, _ in banners if lineno >= b)

    tree = ast.parse(source)
    where: dict[str, int] = {}
    for node in tree.body:
        for name in defined_names(node):
            where.setdefault(name, section(node.lineno))
    bad = []
    for node in tree.body:
        s = section(node.lineno)
        if s == 0:
            continue
        label = getattr(node, "name", None) or ",".join(defined_names(node)) or f"<{type(node).__name__}>"
        for name in sorted(global_uses(node)):
            if where.get(name, 0) > s:
                bad.append((node.lineno, label, titles[s], name, titles[where[name]]))
    return bad


@functools.lru_cache(maxsize=1)
def _source() -> str:
    return (ROOT / "autofocus.py").read_text(encoding="utf-8")


def test_no_definition_uses_a_name_from_a_later_section() -> None:
    bad = back_references(_source())
    assert not bad, "definitions using a name from a later section (move one of the two):\n" + "\n".join(
        f"  line {line}: {label} ({s}) uses {name} ({t})" for line, label, s, name, t in bad)


def test_the_docstring_lists_the_sections_in_their_order() -> None:
    """The module docstring's map of the file names the banner sections, in the file's order."""
    source = _source()
    doc = source.split('"""', 2)[1]  # the module docstring: the file's first string
    match = re.search(r"Sections, in dependency order \([^)]*\): (.*?)\.(?:\n\n|$)", doc, re.S)
    assert match, "the module docstring has no 'Sections, in dependency order (...): A; B; ...' paragraph"
    listed = [" ".join(part.split()) for part in match.group(1).split(";")]
    assert listed == [title for _, title in banner_lines(source.splitlines())]


def test_a_section_moved_below_its_users_is_caught() -> None:
    """The real file with its small helpers moved to the end: every later user of one is listed."""
    source = _source()
    lines = source.splitlines()
    banners = banner_lines(lines)
    tops = [line - 2 for line, _ in banners]
    k = [title for _, title in banners].index("Small helpers")
    tree = ast.parse(source)
    helpers = {name for node in tree.body if tops[k] < node.lineno < tops[k + 1] for name in defined_names(node)}
    users = {getattr(node, "name", None) or ",".join(defined_names(node)) for node in tree.body
             if node.lineno > tops[k + 1] and global_uses(node) & helpers}
    assert {"first_line", "finite_only"} <= helpers and len(users) > 20
    moved = lines[:tops[k]] + lines[tops[k + 1]:] + lines[tops[k]:tops[k + 1]]
    bad = back_references("\n".join(moved) + "\n")
    assert {label for _, label, _, name, _ in bad if name in helpers} == users


LATER = """
from __future__ import annotations
import typing

###############################################################################
# Early #######################################################################
###############################################################################

def body_use():
    return helper()

def annotated(x: Thing) -> None:
    pass

def quoted() -> "list[Thing]":
    pass

T = typing.TypeVar("T", bound="Thing")

class Based(Base):
    pass

@decorate
def decorated():
    pass

def default(x=CONSTANT):
    pass

def in_a_lambda():
    return lambda: helper()

class Method:
    helper = 1
    def m(self):
        return helper  # a class attribute is not in scope here: the global

def declared_global():
    global helper2
    helper2 = 1
    return helper2

def shadowed(helper, Thing: int = 0):
    CONSTANT = 1
    return [Base for Base in range(helper)], CONSTANT, Thing

def nested():
    decorate = 1
    def inner():
        return decorate
    return inner

def caught():
    try:
        pass
    except ValueError as Base:
        return Base
    import os as helper
    return helper

###############################################################################
# Late ########################################################################
###############################################################################

def helper(): pass
def decorate(f): return f
Thing = int
Base = object
CONSTANT = 1
helper2 = 0
"""


def test_the_checker_sees_every_kind_of_use_and_no_local_name() -> None:
    used = {(label, name) for _, label, _, name, _ in back_references(LATER)}
    assert used == {("body_use", "helper"), ("annotated", "Thing"), ("quoted", "Thing"), ("T", "Thing"),
                    ("Based", "Base"), ("decorated", "decorate"), ("default", "CONSTANT"),
                    ("in_a_lambda", "helper"), ("Method", "helper"), ("declared_global", "helper2")}


@pytest.mark.parametrize("name", ["shadowed", "nested", "caught"])
def test_local_names_are_not_uses(name: str) -> None:
    assert name not in {label for _, label, _, _, _ in back_references(LATER)}

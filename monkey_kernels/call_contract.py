"""Call contracts: whether a fused replacement serves every call a model makes to the module it replaces.

A rule that recognises a module by structure must also check how the module is CALLED, or it could patch a
module that looks right but is called otherwise (TextMonkey's blocks take ``lora_idx``, not ``idx``; a container
may loop over windows inside each layer) and hand back a model that fails on its first forward. These helpers
read the class's ``forward`` (a module with an instance-level ``forward``, i.e. a hook, a wrapper or another
patch, does not fit: :func:`class_forward`):

- :func:`forward_parameters_problem`: the signature holds exactly the expected parameters (keywords defaulting to
  ``None``, or to given values, or to anything: :data:`ANY_DEFAULT`);
- :func:`parameters_prefix_problem`: the signature is a prefix of the fused forward's (the fused one takes more);
- :func:`plain_loop_problem`: a container's forward is exactly ``for r in self.<list>: x = r(x, k=k, ...)`` then
  ``return x`` (read from its source with :mod:`ast`);
- :func:`only_forwarded_problem`: a keyword is only handed on, unchanged, to one child;
- :func:`attributes_used_problem`: a method reads the attributes of ``self`` a fused replacement reads (a weaker
  check, for methods too long to match statement by statement, e.g. TextMonkey's window loop: a copy that drops
  one of them does something else);
- :func:`adds_in_place`: whether a forward adds a child's output in place (``y += self.lora[i](x)``), which
  decides the dtype of its result under autocast (not a contract: the fused forward serves both forms).

Each returns ``None`` when the contract holds, else a one-line reason for ``PatchReport.skipped``. A source that
cannot be read (a class defined in ``python -c``) or a decorated / wrapped forward does not fit: the rule cannot
know what it does.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import weakref
from typing import Callable, Mapping, Optional, Sequence, Tuple

from torch import nn

__all__ = ["ANY_DEFAULT", "class_forward", "forward_parameters_problem", "parameters_prefix_problem",
           "plain_loop_problem", "only_forwarded_problem", "attributes_used_problem", "adds_in_place"]

ANY_DEFAULT = object()  # forward_parameters_problem(defaults={name: ANY_DEFAULT}): any default value will do


def class_forward(module: nn.Module) -> Tuple[Optional[Callable], Optional[str]]:
    """``(forward function of the module's class, None)``, or ``(None, problem)`` when an instance-level
    ``forward`` is installed (a hook, a wrapper or another patch): its behaviour is not the class's."""
    if "forward" in module.__dict__:
        installed = module.__dict__["forward"]
        return None, f"an instance-level forward ({type(installed).__name__}) is installed over the class's"
    return type(module).forward, None


def _describe(parameters: Sequence[inspect.Parameter]) -> str:
    return "forward(" + ", ".join(str(p) for p in parameters) + ")"


def forward_parameters_problem(function: Callable, keywords: Sequence[str], optional: Sequence[str] = (),
                               first: Optional[str] = None, expected: str = "",
                               defaults: Optional[Mapping[str, object]] = None) -> Optional[str]:
    """Why ``function(self, <first>, ...)`` does not have exactly the contract ``first`` positional input (any
    name when ``first`` is ``None``), every name of ``keywords`` (defaulting to ``None``, or to
    ``defaults[name]`` when given there: :data:`ANY_DEFAULT` accepts any default) and possibly names of
    ``optional`` (defaulting to ``None``), and nothing else: no other parameter, no ``*args`` / ``**kwargs``.
    ``expected`` describes the contract in the message."""
    defaults = dict(defaults or {})
    try:
        parameters = list(inspect.signature(function).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return f"the signature of forward cannot be read; {expected} expected"
    shown = _describe(parameters)
    if not parameters or parameters[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return f"{shown} has no positional input; {expected} expected"
    if first is not None and parameters[0].name != first:
        return f"{shown} names its input {parameters[0].name!r}, not {first!r}; {expected} expected"
    rest = {p.name: p for p in parameters[1:]}
    variadic = [p.name for p in parameters if p.kind in (inspect.Parameter.VAR_POSITIONAL,
                                                          inspect.Parameter.VAR_KEYWORD)]
    if variadic:
        return f"{shown} takes *args / **kwargs ({', '.join(variadic)}); {expected} expected"
    missing = [k for k in keywords if k not in rest]
    if missing:
        return f"{shown} takes no {', '.join(missing)}; {expected} expected"
    extra = [name for name in rest if name not in keywords and name not in optional]
    if extra:
        return f"{shown} takes {', '.join(extra)}, which the fused forward does not; {expected} expected"
    for name, parameter in rest.items():
        wanted = defaults.get(name)
        positional_only = parameter.kind == inspect.Parameter.POSITIONAL_ONLY
        if wanted is None:
            if positional_only or parameter.default is not None:
                return f"{shown}: {name} must be a keyword defaulting to None; {expected} expected"
            continue
        if positional_only or parameter.default is inspect.Parameter.empty:
            return f"{shown}: {name} must be a keyword with a default; {expected} expected"
        if wanted is not ANY_DEFAULT and not (type(parameter.default) is type(wanted)
                                              and parameter.default == wanted):
            return f"{shown}: {name} must be a keyword defaulting to {wanted!r}; {expected} expected"
    return None


def parameters_prefix_problem(function: Callable, order: Sequence[str], expected: str = "") -> Optional[str]:
    """Why ``function(self, ...)``'s parameters are not a prefix of ``order`` (the fused forward's parameters, in
    its order), all but the first defaulting to ``None``, with no ``*args`` / ``**kwargs``, or ``None``: then
    every call the original accepts, positional or by keyword, means the same to the fused forward."""
    try:
        parameters = list(inspect.signature(function).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return f"the signature of forward cannot be read; {expected} expected"
    shown = _describe(parameters)
    names = [p.name for p in parameters]
    if not names or names != list(order[:len(names)]) or any(
            p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in parameters):
        return f"{shown} is not a prefix of {expected}"
    for parameter in parameters[1:]:
        if parameter.kind == inspect.Parameter.POSITIONAL_ONLY or parameter.default is not None:
            return f"{shown}: {parameter.name} must default to None as in {expected}"
    return None


# Source checks are cached per function (weakly: a class defined in a test goes away with it).
_SOURCE_CHECKS: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def _function_node(function: Callable) -> Tuple[Optional[ast.FunctionDef], Optional[str]]:
    """The AST of ``function`` (its source, dedented), or ``(None, problem)``."""
    if hasattr(function, "__wrapped__"):  # getsource would show the wrapped function, not what runs
        return None, f"its forward is a wrapper (of {getattr(function.__wrapped__, '__qualname__', 'a function')})"
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None, "its source cannot be read (inspect.getsource) to check what forward does"
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None, "its source cannot be parsed to check what forward does"
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None, "its forward is not a plain function definition"
    if node.decorator_list:
        return None, "its forward is decorated (a decorator may change what it does)"
    return node, None


def _cached(function: Callable, key: tuple, check: Callable[[], Optional[str]]) -> Optional[str]:
    try:
        cache = _SOURCE_CHECKS.setdefault(function, {})
    except TypeError:  # not weak-referenceable: check every time
        return check()
    if key not in cache:
        cache[key] = check()
    return cache[key]


def _body(node: ast.FunctionDef) -> list:
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return body


def _is_name(node, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def plain_loop_problem(function: Callable, container: str, keywords: Sequence[str]) -> Optional[str]:
    """Why ``function`` (a container's forward ``forward(self, x, <keywords>...)``) is not exactly::

        for r in self.<container>:
            x = r(x, k=k, ...)          # every name of ``keywords`` handed on as itself, nothing else
        return x

    (a docstring aside), or ``None`` when it is. Read from the source: a forward whose source cannot be read,
    that is decorated, loops otherwise (e.g. over windows inside each layer) or passes other arguments does not
    fit, since a fused replacement would not do what it does."""

    def check() -> Optional[str]:
        node, problem = _function_node(function)
        if problem is not None:
            return problem
        args = [a.arg for a in node.args.posonlyargs + node.args.args]
        if len(args) < 2:
            return "its forward takes no input"
        self_name, x_name = args[0], args[1]
        expected = (f"the plain loop `for r in {self_name}.{container}: {x_name} = r({x_name}, "
                    + ", ".join(f"{k}={k}" for k in keywords) + f")` then `return {x_name}`")
        body = _body(node)
        if len(body) != 2 or not isinstance(body[0], ast.For) or not isinstance(body[1], ast.Return):
            return f"its forward is not {expected}"
        loop, ret = body
        if not (isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Attribute)
                and _is_name(loop.iter.value, self_name) and loop.iter.attr == container and not loop.orelse
                and len(loop.body) == 1 and _is_name(ret.value, x_name)):
            return f"its forward is not {expected}"
        step = loop.body[0]
        call = getattr(step, "value", None)
        if not (isinstance(step, ast.Assign) and len(step.targets) == 1 and _is_name(step.targets[0], x_name)
                and isinstance(call, ast.Call) and _is_name(call.func, loop.target.id) and len(call.args) == 1
                and _is_name(call.args[0], x_name)):
            return f"its forward is not {expected}"
        passed = {kw.arg: kw.value for kw in call.keywords}
        if set(passed) != set(keywords) or not all(_is_name(passed[k], k) for k in keywords):
            return f"its forward's loop passes {sorted(k for k in passed if k)}, not {expected}"
        return None

    return _cached(function, ("loop", container, tuple(keywords)), check)


def only_forwarded_problem(function: Callable, keyword: str, child: str) -> Optional[str]:
    """Why ``keyword`` (a parameter of ``function``) is used otherwise than handed on unchanged as
    ``self.<child>(..., keyword=keyword)`` (at least once), or ``None``. Read from the source, like
    :func:`plain_loop_problem`: a fused ``child`` may then take values the original ``child`` never saw (e.g. one
    adapter id per batch row)."""

    def check() -> Optional[str]:
        node, problem = _function_node(function)
        if problem is not None:
            return problem
        self_name = (node.args.posonlyargs + node.args.args)[0].arg
        forwarded, other = 0, 0
        handed = set()
        for call in ast.walk(node):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and _is_name(call.func.value, self_name) and call.func.attr == child):
                for kw in call.keywords:
                    if kw.arg == keyword and _is_name(kw.value, keyword):
                        handed.add(id(kw.value))
                        forwarded += 1
        for name in ast.walk(node):
            if _is_name(name, keyword) and id(name) not in handed:
                other += 1
        if forwarded == 0:
            return f"its forward does not hand {keyword} on as self.{child}(..., {keyword}={keyword})"
        if other:
            return (f"its forward uses {keyword} otherwise than handing it on to self.{child} "
                    f"({other} other use(s))")
        return None

    return _cached(function, ("forwarded", keyword, child), check)


def attributes_used_problem(function: Callable, names: Sequence[str]) -> Optional[str]:
    """Why ``function`` (a method) does not read every attribute ``self.<name>`` of ``names``, or ``None``.
    Read from the source (a source that cannot be read does not fit). A weaker check than the plain loop's: it
    catches a copy that does something else without one of the attributes, not every edit of the body."""

    def check() -> Optional[str]:
        node, problem = _function_node(function)
        if problem is not None:
            return problem
        arguments = node.args.posonlyargs + node.args.args
        if not arguments:
            return "it takes no self"
        self_name = arguments[0].arg
        read = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and _is_name(n.value, self_name)}
        missing = [name for name in names if name not in read]
        if missing:
            return (f"its {node.name} does not use " + ", ".join(f"{self_name}.{m}" for m in missing)
                    + " (the fused replacement does)")
        return None

    return _cached(function, ("attributes", tuple(names)), check)


def adds_in_place(function: Callable, child: str) -> Optional[bool]:
    """Whether ``function`` (a method) adds what ``self.<child>...(...)`` returns IN PLACE: an augmented
    ``y += <expr>`` whose expression reads ``self.<child>``, directly or through a local name assigned from such an
    expression (``lora_res = self.in_proj_lora[idx](query); mixed += lora_res``, the public Monkey code). ``None``
    when the source cannot be read. Why it matters: under autocast ``y += lora`` keeps ``y``'s dtype (the
    autocast dtype of a linear's output), while ``y = y + lora`` promotes it (to fp32 with an fp32 scale)."""

    def reads_child(expression, self_name: str, names: set) -> bool:
        return any((isinstance(n, ast.Attribute) and n.attr == child and _is_name(n.value, self_name))
                   or (isinstance(n, ast.Name) and n.id in names) for n in ast.walk(expression))

    def check():
        node, problem = _function_node(function)
        if problem is not None:
            return None
        arguments = node.args.posonlyargs + node.args.args
        if not arguments:
            return None
        self_name, from_child = arguments[0].arg, set()
        for statement in ast.walk(node):
            if isinstance(statement, ast.Assign) and reads_child(statement.value, self_name, from_child):
                from_child.update(t.id for t in statement.targets if isinstance(t, ast.Name))
        return any(isinstance(s, ast.AugAssign) and isinstance(s.op, ast.Add)
                   and reads_child(s.value, self_name, from_child) for s in ast.walk(node))

    try:
        cache = _SOURCE_CHECKS.setdefault(function, {})
    except TypeError:
        return check()
    key = ("adds_in_place", child)
    if key not in cache:
        cache[key] = check()
    return cache[key]

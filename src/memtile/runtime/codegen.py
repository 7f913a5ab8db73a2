"""The planned program as data (`Step`s), and two ways to run it.

`compile_program` emits it as one straight-line Python function (as torch.fx does) and compiles
it once: each op is a call with its arguments in local variables, each dead value is `del`eted
at once (so an unplanned op's result is freed as soon as its last reader ran). `interpret` walks
the same steps with a dictionary of values; it exists to measure what codegen saves per op and
to cross-check it.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class Var:
    """A value computed by an earlier step (or a graph input)."""

    name: str


@dataclass(frozen=True)
class ArenaView:
    """The `index`-th planned tensor: a view of the caller's arena."""

    index: int


@dataclass(frozen=True)
class Fresh:
    """A tensor allocated at each call (graph outputs returned to the caller)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass
class Step:
    """`result = fn(*args, **kwargs)`, then `name = result[i]` for each of `items`."""

    fn: Callable
    args: tuple
    kwargs: dict
    result: str
    items: tuple[tuple[str, int], ...] = ()
    label: str = ""  # the graph node it runs, for error messages and listings


@dataclass
class Program:
    """Inputs, steps in execution order, and the flat outputs (`clone` for aliases of inputs)."""

    inputs: tuple[str, ...]
    steps: list[Step]
    outputs: tuple[object, ...]  # Var, or a constant (None, int, ...)
    clone_outputs: frozenset[str] = field(default_factory=frozenset)

    @cached_property
    def dead_after(self) -> list[list[str]]:
        """For each step, the variables whose last reader it is (graph outputs never die)."""
        last: dict[str, int] = {}
        for position, step in enumerate(self.steps):
            for var in _vars((step.args, step.kwargs)):
                last[var.name] = position
            for name in (step.result, *(name for name, _ in step.items)):
                last[name] = position
        for var in _vars(self.outputs):
            last.pop(var.name, None)
        dead: list[list[str]] = [[] for _ in self.steps]
        for name, position in last.items():
            dead[position].append(name)
        return dead


def compile_program(program: Program) -> Callable[[tuple, tuple], list]:
    """`run(inputs, views) -> flat outputs`, as one generated and compiled Python function."""
    source, namespace = generate(program)
    exec(compile(source, "<memtile planned program>", "exec"), namespace)  # noqa: S102
    run = namespace["planned_program"]
    run.source = source
    return run


def generate(program: Program) -> tuple[str, dict]:
    """Python source of the program, and the globals (ops, constants) it refers to."""
    emitter = _Emitter()
    lines = ["def planned_program(inputs, views):"]
    if program.inputs:
        lines.append(f"    {', '.join(_local(n) for n in program.inputs)}, = inputs")
    for step, dead in zip(program.steps, program.dead_after, strict=True):
        call = f"{emitter.constant(step.fn, 'op')}({emitter.call_arguments(step.args, step.kwargs)})"
        lines.append(f"    {_local(step.result)} = {call}  # {step.label}")
        for name, index in step.items:
            lines.append(f"    {_local(name)} = {_local(step.result)}[{index}]")
        if dead:
            lines.append(f"    del {', '.join(_local(n) for n in sorted(dead))}")
    results = [
        f"{emitter.expression(out)}.clone()" if isinstance(out, Var) and out.name in
        program.clone_outputs else emitter.expression(out)
        for out in program.outputs
    ]
    lines.append(f"    return [{', '.join(results)}]")
    return "\n".join(lines) + "\n", emitter.namespace


def interpret(program: Program, inputs: tuple, views: tuple) -> list:
    """Run the program by walking its steps with a dictionary of values (the slow reference)."""
    env = dict(zip(program.inputs, inputs, strict=True))

    def value(arg):
        if isinstance(arg, Var):
            return env[arg.name]
        if isinstance(arg, ArenaView):
            return views[arg.index]
        if isinstance(arg, Fresh):
            return torch.empty_strided(arg.shape, arg.stride, dtype=arg.dtype, device=arg.device)
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    for step, dead in zip(program.steps, program.dead_after, strict=True):
        result = step.fn(*value(step.args), **{k: value(v) for k, v in step.kwargs.items()})
        env[step.result] = result
        for name, index in step.items:
            env[name] = result[index]
        for name in dead:
            del env[name]
    return [
        value(out).clone() if isinstance(out, Var) and out.name in program.clone_outputs
        else value(out)
        for out in program.outputs
    ]


class _Emitter:
    """Turns step arguments into source text; anything not a literal becomes a named global."""

    def __init__(self):
        self.namespace: dict[str, object] = {"_empty_strided": torch.empty_strided}
        self._names: dict[int, str] = {}

    def constant(self, value: object, prefix: str = "c") -> str:
        key = id(value)
        if key not in self._names:
            name = f"_{prefix}{len(self._names)}"
            self._names[key] = name
            self.namespace[name] = value
        return self._names[key]

    def call_arguments(self, args: tuple, kwargs: dict) -> str:
        parts = [self.expression(a) for a in args]
        parts += [f"{k}={self.expression(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    def expression(self, arg) -> str:
        if isinstance(arg, Var):
            return _local(arg.name)
        if isinstance(arg, ArenaView):
            return f"views[{arg.index}]"
        if isinstance(arg, Fresh):
            return (f"_empty_strided({arg.shape!r}, {arg.stride!r}, "
                    f"dtype={self.constant(arg.dtype, 'dtype')}, "
                    f"device={self.constant(arg.device, 'device')})")
        if isinstance(arg, list):
            return f"[{', '.join(self.expression(a) for a in arg)}]"
        if isinstance(arg, tuple):
            return f"({''.join(self.expression(a) + ', ' for a in arg)})"
        if arg is None or isinstance(arg, (bool, int, str)):
            return repr(arg)
        if isinstance(arg, float) and math.isfinite(arg):
            return repr(arg)
        return self.constant(arg)


def _local(name: str) -> str:
    return "v_" + "".join(c if c.isalnum() else "_" for c in name)


def _vars(tree) -> list[Var]:
    if isinstance(tree, Var):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [v for item in tree for v in _vars(item)]
    if isinstance(tree, dict):
        return [v for item in tree.values() for v in _vars(item)]
    return []


def rebind(run: Callable[[tuple, tuple], list], replace: dict[int, object]
           ) -> Callable[[tuple, tuple], list]:
    """`run` with each global constant whose id is in `replace` swapped for its value: the same
    compiled code over other constants (weights packed for another thread count)."""
    namespace = {name: replace.get(id(value), value) for name, value in run.__globals__.items()}
    rebound = types.FunctionType(run.__code__, namespace, run.__name__)
    rebound.source = run.source
    return rebound

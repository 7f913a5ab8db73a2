"""Proof by running: the written .pte is loaded by ExecuTorch's runtime, run on fresh inputs and
compared with the eager model, and its planned buffer sizes are read back from the file."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from executorch.exir._serialize._program import deserialize_pte_binary
from executorch.runtime import Runtime
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtile.numerics import Agreement, agreement

FRESH_SEED = 1  # not the zoo's seed: the check runs on inputs the export never saw


def planned_buffer_sizes(path: Path) -> list[int]:
    """`execution_plan[0].non_const_buffer_sizes` as stored in the file (index 0: constants)."""
    program = deserialize_pte_binary(Path(path).read_bytes()).program
    return list(program.execution_plan[0].non_const_buffer_sizes)


def fresh_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Seeded normal inputs of the example inputs' shapes and dtypes."""
    generator = torch.Generator().manual_seed(FRESH_SEED)
    return tuple(torch.randn(x.shape, generator=generator).to(x.dtype) for x in inputs)


def run_pte(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return [torch.as_tensor(o) for o in method.execute(list(inputs))]


def latency_ms(path: Path, inputs: tuple[torch.Tensor, ...], calls: int = 5) -> float:
    """Median wall time of one `forward` through the runtime (portable kernels)."""
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    method.execute(list(inputs))
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        method.execute(list(inputs))
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2] * 1e3


def compare(path: Path, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Agreement:
    """The .pte's outputs against the eager model's on fresh inputs (memtile.numerics' rule)."""
    fresh = fresh_inputs(inputs)
    with torch.no_grad():
        expected = model(*fresh)
    got = run_pte(path, fresh)
    leaves, structure = tree_flatten(expected)
    if len(got) != len(leaves):  # the runtime returns the program's outputs as one flat list
        return Agreement(float("inf"))
    return agreement(tree_unflatten(got, structure), model, fresh, expected)

"""Models that `PlannedModule` refuses at construction, with one line that says why.

A captured graph that writes into its inputs or buffers has side effects: torch.export turns
them into extra graph outputs (`graph_signature.user_inputs_to_mutate`, `buffers_to_mutate`)
that the caller must copy back. The executor runs inference graphs and returns only the
model's own outputs, so it would drop those writes: a BatchNorm in train mode would keep its
running statistics while eager updates them, and a model that increments a buffer would see
another value at every eager call. It refuses them instead.
"""

from __future__ import annotations

import torch
from torch import nn

from memtile.errors import UnsupportedOpError


def refuse_side_effects(program: torch.export.ExportedProgram, model: nn.Module) -> None:
    """Raise UnsupportedOpError when the captured model writes into an input or a buffer."""
    signature = program.graph_signature
    inputs = sorted(set(signature.user_inputs_to_mutate.values()))
    if inputs:
        raise UnsupportedOpError(
            f"the model writes into its input {_names(inputs)} in place; PlannedModule runs "
            "graphs without side effects: clone the input inside forward, or run it eagerly")
    buffers = sorted(set(signature.buffers_to_mutate.values()))
    norms = [owner for owner in dict.fromkeys(b.rpartition(".")[0] for b in buffers)
             if isinstance(_submodule(model, owner), nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise UnsupportedOpError(
            f"BatchNorm {_names(norms)} is in train mode (it updates its running statistics at "
            "every call); PlannedModule runs inference only: call model.eval() first")
    if buffers:
        raise UnsupportedOpError(
            f"the model updates buffer {_names(buffers)} in place at every call; PlannedModule "
            "runs graphs without side effects: run it eagerly")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _names(names: list[str]) -> str:
    """'a', or 'a' (and 2 more)."""
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{names[0]!r}{more}"

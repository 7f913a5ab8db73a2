"""Errors a user can cause. The CLI prints any of them on one line and exits 2."""


class MemtileError(Exception):
    """Base class: something about the user's input or request is wrong; the message says what."""


class UnknownModelError(MemtileError):
    """A model name that the zoo does not know (the message lists the closest names)."""


class ExportError(MemtileError):
    """torch.export could not trace the model; the message names the op or construct."""


class InputShapeError(MemtileError):
    """Inputs of a shape, dtype or device the model (or a plan made for it) cannot take."""


class UnsupportedOpError(MemtileError):
    """An op that a transformation cannot handle exactly, so the transformation is refused."""


class BudgetError(MemtileError):
    """A memory budget or capacity that cannot be met."""


class ProblemFormatError(MemtileError):
    """A malformed planning problem: bad CSV, negative size, empty lifetime."""


class PlanVerificationError(MemtileError):
    """A plan that breaks the memory model (overlap, misalignment, capacity)."""


class GradientMismatchError(MemtileError):
    """A transformed model whose outputs or gradients differ from the original's (a bug)."""


def first_line(error: BaseException) -> str:
    """`Type: first non-blank line of the message`, at most 300 characters: a foreign library's
    error (an exporter's, a compiler's) retold on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)[:300]

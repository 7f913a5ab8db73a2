"""Model zoo: a name becomes an eval-mode `nn.Module` and its example inputs, with no downloads.

Names: every torchvision classification model, the MLPerf Tiny models built in `memtile.tinyml`,
`mobilenet_v2_035_144`, `timm:NAME` (any timm model), `smp:ARCH:ENCODER` (segmentation-models-pytorch,
e.g. `smp:Unet:resnet18`), a `package.module:attr` callable, or a `.pt2` file from
`torch.export.save`. Weights are initialised from a fixed seed, so two calls give the same model.

Models built by name have their BatchNorm statistics calibrated (`calibrate_norms`): with random
weights and the default running statistics (mean 0, variance 1) a deep net's output is of order
1e-9, and an equivalence check on such outputs proves nothing. A user's own model (`pkg.mod:attr`,
`.pt2`) keeps the statistics it came with.
"""

import difflib
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from memtile import tinyml
from memtile.errors import InputShapeError, MemtileError, UnknownModelError, first_line

SEED = 0

# name -> (builder, default input shape without the batch axis)
_TINY: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "ds_cnn_kws": (tinyml.ds_cnn_kws, (1, 49, 10)),
    "mobilenet_v1_025_vww": (tinyml.mobilenet_v1, (3, 96, 96)),
    "resnet8_cifar": (tinyml.resnet8_cifar, (3, 32, 32)),
    "autoencoder_ad": (tinyml.autoencoder_ad, (640,)),
    "mobilenet_v2_035_144": (
        lambda: torchvision.models.mobilenet_v2(weights=None, width_mult=0.35),
        (3, 144, 144),
    ),
}
TINY_MODELS = tuple(_TINY)
_TORCHVISION_KWARGS = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}
_TORCHVISION_SHAPE = {"inception_v3": (3, 299, 299)}
SMP_INPUT_SHAPE = (3, 256, 256)
CALIBRATION_BATCH = 4
CALIBRATION_PASSES = 3
_INSTALL_MODELS = "pip install 'memtile[models]'"


def torchvision_models() -> list[str]:
    """Every torchvision classification model name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def names() -> list[str]:
    """Every model name the zoo can build by name."""
    return torchvision_models() + list(_TINY)


def default_input_shape(name: str) -> tuple[int, ...]:
    """The input shape (without batch) a zoo model is benchmarked at."""
    if name in _TINY:
        return _TINY[name][1]
    if name.startswith("timm:"):
        return _timm_input_shape(name.removeprefix("timm:"))
    if name.startswith("smp:"):
        return SMP_INPUT_SHAPE
    return _TORCHVISION_SHAPE.get(name, (3, 224, 224))


def is_zoo_name(name: str) -> bool:
    """True for names `build` makes (as opposed to `pkg.mod:attr` callables and `.pt2` files)."""
    return name.startswith(("timm:", "smp:")) or (":" not in name and not name.endswith(".pt2"))


def build(name: str) -> nn.Module:
    """Build a zoo model by name, deterministically initialised and calibrated, in eval mode."""
    torch.manual_seed(SEED)
    if name in _TINY:
        model = _TINY[name][0]()
    elif name.startswith("timm:"):
        model = _build_timm(name.removeprefix("timm:"))
    elif name.startswith("smp:"):
        model = _build_smp(name.removeprefix("smp:"))
    elif name in torchvision_models():
        model = torchvision.models.get_model(name, weights=None, **_TORCHVISION_KWARGS.get(name, {}))
    else:
        raise _unknown(name)
    return calibrate_norms(model, default_input_shape(name))


@torch.no_grad()
def calibrate_norms(model: nn.Module, input_shape: tuple[int, ...],
                    passes: int = CALIBRATION_PASSES, batch: int = CALIBRATION_BATCH) -> nn.Module:
    """Set every BatchNorm's running statistics from train-mode passes on seeded random data.

    The momentum is switched to a cumulative average for the passes, so the statistics are the
    exact mean over them, not 10% of the way from the defaults. The model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator = torch.Generator().manual_seed(SEED + 1)
    model.train()
    try:
        for _ in range(passes):
            model(torch.randn((batch, *input_shape), generator=generator))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return model


def get(
    name: str, batch: int = 1, input_shape: tuple[int, ...] | None = None
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Return `(model, example_inputs)` for a zoo name, `pkg.mod:attr` callable or `.pt2` file.

    The inputs always have `batch` rows: inputs that a `.pt2` file or a callable brings with
    them are cut or repeated along their first axis, and the model is run once to show that
    it takes them (a model that cannot is refused here, with the reason).
    """
    if batch < 1:
        raise InputShapeError(f"batch must be at least 1, got {batch}")
    if name.endswith(".pt2"):
        model, inputs = _load_exported(Path(name), input_shape)
    elif is_zoo_name(name):
        model, inputs = build(name), None
    else:
        model, inputs = _load_callable(name, input_shape)
    if inputs is None:
        shape = tuple(input_shape) if input_shape else _shape_for(name)
        inputs = (_example((batch, *shape)),)
    else:
        inputs = tuple(_rebatched(t, batch, name) for t in inputs)
    _check_runs(model, inputs, name)
    return model, inputs


def _shape_for(name: str) -> tuple[int, ...]:
    if not is_zoo_name(name):
        raise InputShapeError(f"{name} returned a module without inputs: pass --input-shape C,H,W")
    return default_input_shape(name)


def _allocated(shape: tuple[int, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()`, with the allocator's failure for a huge shape as a one-line error."""
    try:
        return make()
    except (RuntimeError, MemoryError) as error:
        if "allocate" not in str(error) and not isinstance(error, MemoryError):
            raise
        raise InputShapeError(
            f"inputs of shape {shape} do not fit in memory ({_numel(shape) * 4 / 2**30:.3g} GiB "
            "as float32); use a smaller --batch or --input-shape"
        ) from None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _example(full: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded example data: normal floats, or 0/1 for integer inputs (valid indices anywhere)."""
    if any(d < 1 for d in full):
        raise InputShapeError(f"input shape {full[1:]} has a non-positive dimension")
    generator = torch.Generator().manual_seed(SEED)
    if dtype.is_floating_point or dtype.is_complex:
        return _allocated(full, lambda: torch.randn(full, generator=generator, dtype=dtype))
    if dtype == torch.bool:
        return _allocated(full, lambda: torch.randint(0, 2, full, generator=generator).bool())
    return _allocated(full, lambda: torch.randint(0, 2, full, generator=generator, dtype=dtype))


def _rebatched(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """`tensor` with `batch` rows: its first rows, or its rows repeated in turn."""
    if not isinstance(tensor, torch.Tensor):
        raise MemtileError(f"{name}: inputs must be tensors, got {type(tensor).__name__}")
    if tensor.dim() == 0 or tensor.shape[0] == batch:
        return tensor
    shape = (batch, *tensor.shape[1:])
    return _allocated(shape, lambda: tensor[torch.arange(batch) % tensor.shape[0]].contiguous())


def _check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str) -> None:
    """Run once so that a wrong input shape is a one-line error here, not a trace deep in export.

    On fake tensors first: shapes only, no compute and no memory. A resolution that does not fit
    an eager forward is what row bands are for (smp Unet(resnet34) at 5632²: a 15 GB process for
    a 3.5 GB banded step). For real where fake tensors cannot run the model (an op without a
    fake kernel, data-dependent code), which also gives the error its real message."""
    try:
        with torch.no_grad():
            if not _runs_on_fake_tensors(model, inputs):
                model(*inputs)
    except Exception as error:  # the user's forward may raise anything; say what and where
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise InputShapeError(f"{name} cannot run on inputs {shapes}: {first_line(error)}") from error


def _runs_on_fake_tensors(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether `model` runs on fake copies of `inputs`. Its parameters stay real; a norm in
    training mode keeps its running statistics (a real run updates them) and still counts the
    batch in `num_batches_tracked`, as a real run does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            model(*(mode.from_tensor(t) for t in inputs))
    except Exception:  # noqa: BLE001 - any failure is judged by the real run
        return False
    return True


def _load_callable(spec: str, input_shape) -> tuple[nn.Module, tuple | None]:
    """The model (and inputs, if it brings them) that `package.module:attr` names: an
    `nn.Module`, or a function of no arguments that returns a module or `(module, inputs)`."""
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: the user's own modules
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UnknownModelError(f"cannot load {spec!r}: {error}") from error
    torch.manual_seed(SEED)
    made = found if isinstance(found, nn.Module) else _call_factory(spec, found)
    model, inputs = made if isinstance(made, tuple | list) and len(made) == 2 else (made, None)
    if not isinstance(model, nn.Module):
        raise MemtileError(
            f"{spec} gave {type(made).__name__}; expected an nn.Module or (nn.Module, inputs)"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if inputs is not None and not (
        isinstance(inputs, tuple | list) and inputs and all(isinstance(t, torch.Tensor) for t in inputs)
    ):
        raise MemtileError(
            f"{spec} returned inputs of type {type(inputs).__name__}; expected a tensor or a "
            "tuple of tensors"
        )
    if input_shape is not None:
        inputs = None
    return model.eval(), None if inputs is None else tuple(inputs)


def _call_factory(spec: str, factory) -> object:
    if not callable(factory):
        raise MemtileError(f"{spec} is a {type(factory).__name__}; expected an nn.Module or a function")
    try:
        return factory()
    except TypeError as error:
        if "argument" in str(error):
            raise MemtileError(
                f"{spec} cannot be called without arguments ({error}); point at a function of "
                "no arguments that returns the model, or at the model itself"
            ) from error
        raise MemtileError(f"{spec} raised TypeError: {error}") from error
    except Exception as error:  # the user's code: report it on one line
        raise MemtileError(f"{spec} raised {type(error).__name__}: {error}") from error


def _load_exported(path: Path, input_shape) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The program's module and seeded inputs of its placeholders' shapes and dtypes (with
    `input_shape`, the first input's shape after the batch axis)."""
    if not path.is_file():
        raise UnknownModelError(f"no such file: {path}")
    export_log = logging.getLogger("torch.export")  # it logs the load's traceback as a warning
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        program = torch.export.load(str(path))
    except Exception as error:  # torch raises many types for a corrupt archive
        raise MemtileError(f"{path} is not a torch.export archive: {error}") from error
    finally:
        export_log.setLevel(level)
    placeholders = [
        node.meta["val"]
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    # a dynamic dimension is a symbol: take the size it was exported with (`get` then applies
    # --batch to the first axis)
    shapes = [tuple(optimization_hint(d, fallback=2) for d in v.shape) for v in placeholders]
    if input_shape is not None:
        shapes[0] = (shapes[0][0], *input_shape)
    inputs = tuple(
        _example(shape, v.dtype)
        for shape, v in zip(shapes, placeholders, strict=True)
    )
    return program.module(), inputs


def _timm(name: str):
    """The timm package, once `name` is known to be one of its models."""
    try:
        import timm
    except ImportError as error:
        raise MemtileError(f"timm:{name} needs timm: {_INSTALL_MODELS}") from error
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join('timm:' + c for c in close)}" if close else ""
        raise UnknownModelError(f"unknown timm model {name!r}{hint}")
    return timm


def _timm_input_shape(name: str) -> tuple[int, ...]:
    return tuple(_timm(name).models.get_pretrained_cfg(name).input_size)


def _build_timm(name: str) -> nn.Module:
    return _timm(name).create_model(name, pretrained=False)


def _build_smp(spec: str) -> nn.Module:
    arch, _, encoder = spec.partition(":")
    try:
        import segmentation_models_pytorch as smp
    except ImportError as error:
        raise MemtileError(f"smp:{spec} needs segmentation-models-pytorch: {_INSTALL_MODELS}") from error
    if not encoder:
        raise UnknownModelError(f"smp:{spec}: name the encoder too, e.g. smp:{arch or 'Unet'}:resnet18")
    for kind, given, known in (("architecture", arch.lower(), list(smp.MODEL_ARCHITECTURES_MAPPING)),
                               ("encoder", encoder, smp.encoders.get_encoder_names())):
        if given not in known:
            close = difflib.get_close_matches(given, known, n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else f"; known: {', '.join(known[:12])}, ..."
            raise UnknownModelError(f"smp:{spec}: unknown {kind} {given!r}{hint}")
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None)


def _unknown(name: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, names(), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else "; `memtile profile --list` prints all names"
    return UnknownModelError(f"unknown model {name!r}{hint}")

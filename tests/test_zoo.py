import pytest
import torch
import torchvision
from torch import nn

from memtile import zoo
from memtile.errors import InputShapeError, UnknownModelError

HEAVY_PARAMETERS = 60_000_000  # building one (weights, calibrated norms) takes 3-37 s


def _builds(name: str):
    """A model to build; those over HEAVY_PARAMETERS (torchvision's metadata, nothing fetched)
    only in the slow run, which keeps the default run under 15 minutes on 2 cores."""
    try:
        meta = next(iter(torchvision.models.get_model_weights(name))).meta
    except ValueError:  # no weights registered: not known to be heavy
        return name
    heavy = meta.get("num_params", 0) > HEAVY_PARAMETERS
    return pytest.param(name, marks=pytest.mark.slow) if heavy else name


@pytest.mark.parametrize("name", [_builds(n) for n in zoo.torchvision_models()])
def test_every_torchvision_model_builds(name):
    model = zoo.build(name)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) > 0


TINY_OUTPUTS = {
    "ds_cnn_kws": (1, 12),
    "mobilenet_v1_025_vww": (1, 2),
    "resnet8_cifar": (1, 10),
    "autoencoder_ad": (1, 640),
    "mobilenet_v2_035_144": (1, 1000),
}


@pytest.mark.parametrize("name", zoo.TINY_MODELS)
def test_tiny_models_run_at_their_input_shape(name):
    model, inputs = zoo.get(name)
    with torch.no_grad():
        assert tuple(model(*inputs).shape) == TINY_OUTPUTS[name]
    assert tuple(inputs[0].shape[1:]) == zoo.default_input_shape(name)


def test_builds_are_deterministic():
    a, x = zoo.get("resnet8_cifar", batch=2)
    b, y = zoo.get("resnet8_cifar", batch=2)
    assert torch.equal(x[0], y[0]) and x[0].shape[0] == 2
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_mobilenet_v1_vww_width_is_a_quarter():
    model = zoo.build("mobilenet_v1_025_vww")
    assert model[0][0].out_channels == 8 and model[-1].in_features == 256


def test_unknown_name_lists_closest():
    with pytest.raises(UnknownModelError, match="resnet18"):
        zoo.get("resnet19")


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(InputShapeError, match=r"cannot run on inputs \(1, 1, 32, 32\)"):
        zoo.get("resnet8_cifar", input_shape=(1, 32, 32))


def test_callable_and_pt2_models(tmp_path):
    model, inputs = zoo.get("tests_models:conv_flatten_linear", input_shape=(3, 8, 8))
    assert tuple(inputs[0].shape) == (1, 3, 8, 8)
    program = torch.export.export(model, inputs)
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    loaded, loaded_inputs = zoo.get(str(path))
    assert torch.allclose(loaded(*loaded_inputs), model(*loaded_inputs))
    with pytest.raises(InputShapeError, match="--input-shape"):
        zoo.get("tests_models:conv_flatten_linear")


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet8_cifar", "timm:regnetx_002", "smp:Unet:resnet18"])
def test_norm_statistics_are_calibrated_so_outputs_are_of_order_one(name):
    model, inputs = zoo.get(name)
    with torch.no_grad():
        scale = model(*inputs).abs().mean().item()
    assert 1e-2 < scale < 1e2, f"{name}: output scale {scale:.3g}"  # uncalibrated: ~1e-9
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert all(m.momentum == 0.1 for m in norms)  # restored after the cumulative passes


def test_timm_and_smp_names_build_with_their_input_shapes():
    _, (x,) = zoo.get("timm:tinynet_a", batch=2)
    assert tuple(x.shape) == (2, 3, 192, 192)
    model, (x,) = zoo.get("smp:Linknet:resnet18")
    assert tuple(x.shape) == (1, 3, 256, 256) and not model.training


@pytest.mark.parametrize("name, hint", [
    ("timm:regnetx_00", "closest: timm:regnetx_0"),
    ("smp:Unet", "name the encoder"),
    ("smp:Unetz:resnet18", "unknown architecture 'unetz'"),
    ("smp:Unet:resnet1", "unknown encoder 'resnet1'; closest: resnet18"),
])
def test_unknown_timm_and_smp_names_are_clear_errors(name, hint):
    with pytest.raises(UnknownModelError, match=hint):
        zoo.get(name)


def test_user_models_keep_their_own_statistics():
    model, _ = zoo.get("tests_models:conv_bn_relu")
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var))
               for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_the_input_check_runs_on_fake_tensors_and_for_real_only_where_those_cannot():
    """A model at a resolution that does not fit an eager forward (what row bands are for) is
    checked without computing it; a data-dependent forward is run for real; a wrong shape is
    still a one-line error with the real message."""
    from torch._subclasses.fake_tensor import FakeTensor

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.real_calls = 0

        def forward(self, x):
            self.real_calls += not isinstance(x, FakeTensor)
            return self.conv(x)

    class DataDependent(Recording):
        def forward(self, x):
            out = super().forward(x)
            return out if out.sum() > 0 else -out

    model = Recording()
    zoo._check_runs(model, (torch.randn(1, 3, 16, 16),), "recording")
    assert model.real_calls == 0
    model = DataDependent()
    zoo._check_runs(model, (torch.randn(1, 3, 16, 16),), "data-dependent")
    assert model.real_calls == 1
    with pytest.raises(InputShapeError, match="expected input.*to have 3 channels"):
        zoo._check_runs(Recording(), (torch.randn(1, 5, 16, 16),), "recording")

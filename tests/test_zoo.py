import pytest
import torch

from memtile import zoo
from memtile.errors import InputShapeError, UnknownModelError


@pytest.mark.parametrize("name", zoo.torchvision_models())
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
    for p, q in zip(a.parameters(), b.parameters()):
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

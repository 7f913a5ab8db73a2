"""Small 1x1 convolutions as one GEMM over channels_last rows (`convolution.MatmulInto`): which
ones, fused with what, and that they compute eager's values, NaN and Inf included."""

import pytest
import torch
from test_runtime_fusion import with_random_batch_norm
from torch import nn

from memtile.runtime import PlannedModule, convolution
from memtile.runtime.outvariants import relative_error

CONV_TOLERANCE = 1e-5  # the planned convolution's, as in test_runtime


class OneByOnes(nn.Module):
    """A 3x3 stem (+ batch norm), then 1x1 convolutions in the roles real nets give them: expansion (+ batch
    norm + ReLU6), projection (+ batch norm + residual add), squeeze-excite on the pooled map (+
    bias + SiLU), and one with 16 input channels (too few for the GEMM rule)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.expand = nn.Conv2d(32, 48, 1, bias=False)
        self.project = nn.Conv2d(48, 32, 1, bias=False)
        self.excite = nn.Conv2d(32, 32, 1)
        self.narrow = nn.Conv2d(32, 16, 1, bias=False)
        self.widen = nn.Conv2d(16, 32, 1, bias=False)
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for c in (32, 48, 32))

    def forward(self, x):
        a = self.bn[0](self.stem(x))  # no activation: Inf reaches the GEMMs
        b = nn.functional.relu6(self.bn[1](self.expand(a)))
        c = self.bn[2](self.project(b)) + a
        gate = nn.functional.silu(self.excite(c.mean((2, 3), keepdim=True)))
        return torch.relu(self.widen(self.narrow(c * gate)))


def calibrated() -> nn.Module:
    torch.manual_seed(0)
    return with_random_batch_norm(OneByOnes()).eval()


def kernels(module: PlannedModule) -> dict[str, str]:
    """Convolution node name -> "gemm" or "onednn", as the module runs it."""
    return {name: "gemm" if isinstance(v.overload, convolution.MatmulInto) else "onednn"
            for name, v in module.main.planned.items() if convolution.is_into(v)}


@pytest.mark.parametrize("pack_weights", [True, False])
def test_small_one_by_one_convolutions_run_as_gemms_with_eager_values(pack_weights):
    """The expansion, projection and excite convolutions run as GEMMs (batch norm folded into the
    packed matrix's bias, the residual add accumulated, SiLU in place after); the 3x3 stem and
    the 16-channel one stay oneDNN's (unpacked, the stem runs unplanned: it reads the NCHW input). Outputs within the convolution tolerance of eager, and
    NaN, +Inf and -Inf where eager puts them."""
    model = calibrated()
    x = torch.randn(1, 3, 16, 16)
    module = PlannedModule(model, (x,), pack_weights=pack_weights)
    found = kernels(module)  # unpacked, the stem (reading the NCHW input) runs unplanned
    assert list(found.values()).count("gemm") == 4
    assert found["convolution_5"] == "onednn" and found.get("convolution", "onednn") == "onednn"
    if pack_weights:
        chains = {pair.chain.convolution.name: pair.chain for pair in module.main.fused.values()}
        gemm_chains = [c for name, c in chains.items() if found[name] == "gemm"]
        assert sum(c.add is not None for c in gemm_chains) == 1
        assert sum(bool(c.activation) for c in gemm_chains) == 1
    with torch.no_grad():
        expected = model(x)
    assert relative_error(expected, module(x)) <= CONV_TOLERANCE
    for position, value in ((0, float("nan")), (40, float("inf")), (300, -float("inf"))):
        y = x.clone()
        y.view(-1)[position] = value
        with torch.no_grad():
            expected = model(y)
        got = module(y)
        assert not expected.isfinite().all()
        assert torch.equal(expected.isnan(), got.isnan())
        assert torch.equal(expected == float("inf"), got == float("inf"))
        finite = expected.isfinite()
        assert relative_error(expected[finite], got[finite]) <= CONV_TOLERANCE


def test_the_rule_takes_small_one_by_one_layers_only():
    """1x1, stride 1, unpadded, one group, >= 32 input channels (or <= 64 rows), <= 16M
    multiply-adds."""
    fits = convolution.runs_as_matmul
    assert fits((1, 144, 28, 28), (32, 144, 1, 1), [1, 1], [0, 0], 1)
    assert not fits((1, 16, 112, 112), (96, 16, 1, 1), [1, 1], [0, 0], 1)  # few channels
    assert fits((8, 16, 1, 1), (96, 16, 1, 1), [1, 1], [0, 0], 1)  # ... but few rows
    assert not fits((8, 144, 28, 28), (32, 144, 1, 1), [1, 1], [0, 0], 1)  # 29M MACs
    assert not fits((1, 64, 28, 28), (64, 64, 1, 1), [2, 2], [0, 0], 1)
    assert not fits((1, 64, 28, 28), (64, 64, 3, 3), [1, 1], [1, 1], 1)
    assert not fits((1, 64, 28, 28), (64, 32, 1, 1), [1, 1], [0, 0], 2)


def test_a_gemm_into_an_nchw_destination_computes_apart_and_copies():
    """`out` not channels_last: the rows are computed into a channels_last temporary and copied
    (the construction check then sees the allocation and leaves such a node unplanned)."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 5).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, 32, 1, 1), torch.randn(8)
    out = torch.empty(2, 8, 5, 5)
    got = convolution.MatmulInto()(x, weight, bias, [0, 0], [1, 1], [1, 1], 1, out=out)
    assert got is out
    assert relative_error(nn.functional.conv2d(x, weight, bias), out) <= CONV_TOLERANCE

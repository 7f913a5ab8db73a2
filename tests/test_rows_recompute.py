"""Recomputing the stem for later readers: a copy of the chain from the image feeds every
consumer of the stem's output but the first, with the same parameters and the same result."""

import torch
from tests_models import nearest_unet
from torch import nn

from memtile.rows.recompute import recompute_stem, stem
from memtile.trace import trace


class TwoSkips(nn.Module):
    """A stem (conv, relu) read by a body and by two later skips."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.conv(x))
        b = self.body(s)
        return torch.cat([b + s, s * 2], 1)


def test_each_later_reader_gets_its_own_copy_of_the_stem():
    model = TwoSkips()
    gm = trace(model)
    copied, names = recompute_stem(gm)
    assert names == ["conv", "relu"]
    convs = [n for n in copied.graph.nodes if n.op == "call_module" and n.target == "conv"]
    assert len(convs) == 3  # the body's, and one per skip
    relus = [n for n in copied.graph.nodes if n.name.startswith("relu")]
    assert all(len(r.users) == 1 for r in relus)
    assert copied.get_submodule("conv") is model.conv  # parameters are shared, not copied
    assert len([n for n in gm.graph.nodes if n.op == "call_module"]) == 2  # gm is unchanged
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(copied(x), model(x))


def test_no_stem_where_the_input_branches_or_nothing_does():
    class InputTwice(nn.Module):
        def forward(self, x):
            return torch.relu(x) + x

    class Chain(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    class WritesTheImage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.act(x)
            return y * 2 + y

    assert recompute_stem(trace(InputTwice())) is None
    assert recompute_stem(trace(Chain())) is None
    assert recompute_stem(trace(WritesTheImage())) is None
    assert [n.name for n in stem(trace(nearest_unet()[0]))] == [
        "down_0_0", "down_0_1", "down_0_2"]

"""Issue 15: a user's mistake is one line on stderr and exit 2; no silently wrong answer.

The fixture models below are loaded by the CLI as `test_errors:NAME` (the zoo's
`package.module:attr` form; tests/ is on sys.path).
"""

import json
import logging

import pytest
import torch
from torch import nn

from memtile import zoo
from memtile.cli import main
from memtile.errors import MemtileError


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class TupleOutput(Conv):
    def forward(self, x):
        y = self.conv(x)
        return y, y.relu()


class DictOutput(Conv):
    def forward(self, x):
        y = self.conv(x)
        return {"features": y, "positive": y.relu()}


class NoParameters(nn.Module):
    def forward(self, x):
        return x.relu() * 2


class RaisesTypeError(nn.Module):
    def forward(self, x):
        raise TypeError("this model takes a dict")


class RaisesIndexError(nn.Module):
    def forward(self, x):
        return x.unbind(0)[3]  # batch 1: IndexError


def _x() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16)


INSTANCE = Conv()  # a module, not a factory


def pair():
    return Conv(), _x()


def pair_with_list():
    return Conv(), [_x()]


def pair_with_none():
    return Conv(), None


def factory_raises():
    raise ValueError("no weights here")


def factory_needs_arguments(width):
    return Conv()


def forward_raises_type_error():
    return RaisesTypeError(), _x()


def forward_raises_index_error():
    return RaisesIndexError(), _x()


def tuple_output():
    return TupleOutput(), _x()


def dict_output():
    return DictOutput(), _x()


def no_parameters():
    return NoParameters(), _x()


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- item 9 and the argument parsers: one line, exit 2 ------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["tile", "resnet8_cifar", "--budget", "12XB"], "cannot read '12XB' as a byte size"),
    (["train", "resnet8_cifar", "--budget", "12XB"], "cannot read '12XB' as a byte size"),
    (["plan", "x.csv", "--capacity", "1e400"], "too large"),
    (["plan", "x.csv", "--time-limit", "inf"], "time limit"),
    (["plan", "x.csv", "--time-limit", "0"], "time limit"),
    (["plan", "x.csv", "--time-limit", "-5"], "time limit"),
    (["plan", "x.csv", "--time-limit", "nan"], "time limit"),
    (["tile", "resnet8_cifar", "--max-seconds", "-1"], "time limit"),
    (["export", "resnet8_cifar", "--time-limit", "0"], "time limit"),
    (["export", "resnet8_cifar", "--budget", "12XB"], "cannot read '12XB' as a byte size"),
    (["profile", "resnet8_cifar", "--input-shape", "3,x,224"], "cannot read '3,x,224' as a shape"),
    (["profile", "resnet8_cifar", "--input-shape", "4,x,64"], "cannot read '4,x,64' as a shape"),
    (["profile", "resnet8_cifar", "--input-shape", "3,,32,32"], "as a shape"),
])
def test_bad_arguments_are_one_line_exit_2(capsys, argv, message):
    assert message in _one_line_exit_2(capsys, argv)


def test_input_shape_reads_commas_or_x_but_never_drops_a_part():
    import argparse

    from memtile.commands.common import parse_shape

    assert parse_shape("3,32,32") == parse_shape("3x32x32") == (3, 32, 32)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_shape("3,x,224")  # was read as (3, 224)


def test_unknown_model_hint_names_a_command_that_exists(capsys, tmp_path):
    line = _one_line_exit_2(capsys, ["profile", "qqqqqqqq", "--out", str(tmp_path)])
    assert "memtile profile --list" in line
    assert main(["profile", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "resnet8_cifar" in listed and "mobilenet_v2" in listed


# -- item 10: pkg.module:attr mistakes ----------------------------------------------------------

@pytest.mark.parametrize("attr, message", [
    ("pair_with_none", "without inputs: pass --input-shape"),
    ("factory_raises", "raised ValueError: no weights here"),
    ("factory_needs_arguments", "cannot be called without arguments"),
    ("forward_raises_type_error", "TypeError: this model takes a dict"),
    ("forward_raises_index_error", "IndexError: tuple index out of range"),
])
def test_model_callable_mistakes_are_one_line_exit_2(capsys, tmp_path, attr, message):
    line = _one_line_exit_2(capsys, ["profile", f"test_errors:{attr}", "--out", str(tmp_path)])
    assert message in line


def test_a_module_instance_and_a_list_of_inputs_are_accepted():
    model, inputs = zoo.get("test_errors:INSTANCE", input_shape=(3, 8, 8))
    assert model is INSTANCE and inputs[0].shape == (1, 3, 8, 8)
    _, inputs = zoo.get("test_errors:pair_with_list")
    assert isinstance(inputs, tuple) and inputs[0].shape == (1, 3, 16, 16)


# -- item 2: --batch is applied to the inputs a model brings ------------------------------------

def test_batch_applies_to_inputs_a_factory_returns():
    _, inputs = zoo.get("test_errors:pair", batch=8)
    assert inputs[0].shape == (8, 3, 16, 16)
    one = zoo.get("test_errors:pair")[1][0]
    assert torch.equal(inputs[0][3], one[0])  # the factory's row, repeated


def test_batch_applies_to_a_pt2_file_and_integer_inputs_are_made(tmp_path):
    # item 14: an int64 input (token ids) used to fail in torch.randn
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    path = tmp_path / "tokens.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(model, (torch.zeros(2, 3, dtype=torch.long),),
                            dynamic_shapes=({0: batch},)), str(path))
    _, inputs = zoo.get(str(path), batch=5)
    assert inputs[0].shape == (5, 3) and inputs[0].dtype == torch.long


def test_batch_that_a_static_pt2_cannot_take_is_refused(tmp_path):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(Conv().eval(), (_x(),)), str(path))
    with pytest.raises(MemtileError, match=r"cannot run on inputs \(4, 3, 16, 16\)"):
        zoo.get(str(path), batch=4)


def test_a_corrupt_pt2_is_one_error_without_torch_logging_a_traceback(tmp_path):
    path = tmp_path / "corrupt.pt2"
    path.write_text("not a zip archive")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("torch.export")
    logger.addHandler(handler)
    try:
        with pytest.raises(MemtileError, match="is not a torch.export archive"):
            zoo.get(str(path))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []


# -- item 8: the public API works after its submodules are imported -----------------------------

def test_capture_and_measure_stay_callable():
    import memtile.capture  # importing a submodule used to shadow the function of its name
    import memtile.measure
    from memtile.lifetimes import load

    model, inputs = Conv().eval(), (_x(),)
    for _ in range(2):
        graph = memtile.capture(model, inputs)
        with torch.no_grad():
            peak = memtile.measure(model, *inputs).peak_bytes
        assert load(graph) > 0 and peak > 0


# -- item 11 (CLI) and 13: tuple and dict outputs, models with nothing to train -----------------

@pytest.mark.parametrize("attr", ["tuple_output", "dict_output"])
def test_run_compares_every_output_of_a_tuple_or_dict(capsys, attr):
    assert main(["run", f"test_errors:{attr}", "--iters", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_rel_diff"] <= 1e-5


def test_report_on_a_dict_output_model_writes_every_section(tmp_path, capsys):
    assert main(["report", "test_errors:dict_output", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "index.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".memtile-report-")]


def test_report_that_fails_leaves_no_partial_files(tmp_path, capsys, monkeypatch):
    from memtile.commands import plan

    def fail(*args):
        raise MemtileError("planning refused")

    monkeypatch.setattr(plan, "report_section", fail)
    assert main(["report", "test_errors:pair", "--out", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []  # the profile section's timeline.png is gone too


def test_profile_train_sums_a_dict_output(capsys, tmp_path):
    assert main(["profile", "test_errors:dict_output", "--train", "--json", "--out",
                 str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["measured_peak_bytes"] > 0


def test_profile_train_without_parameters_is_one_line_exit_2(capsys, tmp_path):
    line = _one_line_exit_2(capsys, ["profile", "test_errors:no_parameters", "--train",
                                     "--out", str(tmp_path)])
    assert "no trainable parameters" in line or "none" in line


def test_profile_train_that_the_model_cannot_take_is_one_line_exit_2(capsys, tmp_path):
    message = _one_line_exit_2(capsys, ["profile", "autoencoder_ad", "--train", "--out",
                                        str(tmp_path)])
    assert "the training step failed: Expected more than 1 value per channel" in message


# -- item 15: inputs too large for memory --------------------------------------------------------

@pytest.mark.parametrize("argv", [["--input-shape", "3,100000,100000"],
                                  ["--batch", "1000000000"]])
def test_inputs_too_large_for_memory_are_one_line_exit_2(capsys, tmp_path, argv):
    line = _one_line_exit_2(capsys, ["profile", "resnet8_cifar", *argv, "--out", str(tmp_path)])
    assert "do not fit in memory" in line


# -- items 16-19: planning inputs ----------------------------------------------------------------

def _csv(tmp_path, text: str, name: str = "problem.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return str(path)


def test_negative_lower_is_one_line_exit_2(capsys, tmp_path):
    path = _csv(tmp_path, "id,lower,upper,size\n0,-5,3,10\n1,0,4,8\n")
    line = _one_line_exit_2(capsys, ["plan", path, "--out", str(tmp_path)])
    assert "line 2" in line and "steps count from 0" in line


def test_a_byte_order_mark_is_not_part_of_the_first_column(capsys, tmp_path):
    path = _csv(tmp_path, "\ufeffid,lower,upper,size\n0,0,3,10\n")
    assert main(["plan", path, "--strategy", "best", "--json", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["buffers"] == 1


def test_sizes_beyond_cp_sat_keep_the_heuristic_plan_unproven(tmp_path):
    import random

    from memtile.planning import Problem, solve

    rng = random.Random(2)
    lines = ["id,lower,upper,size"]
    for i in range(40):
        start = rng.randint(0, 10)
        lines.append(f"{i},{start},{start + rng.randint(1, 8)},{rng.randint(5 * 10**17, 10**18)}")
    problem = Problem.from_csv(_csv(tmp_path, "\n".join(lines) + "\n"))
    plan = solve(problem, "optimal", time_limit=2.0)  # used to raise OverflowError in Domain
    assert plan.arena_bytes > 2**63 and not plan.optimal


def test_out_folder_whose_plan_json_is_a_folder_is_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "plan.json").mkdir()
    path = _csv(tmp_path, "id,lower,upper,size\n0,0,3,10\n")
    line = _one_line_exit_2(capsys, ["plan", path, "--strategy", "best", "--out", str(tmp_path)])
    assert "plan.json" in line and "cannot write" in line


def test_plan_with_a_capacity_runs_the_search_when_nothing_else_fits(capsys, tmp_path):
    # MiniMalloc's challenging instance A: no heuristic and no CP-SAT plan fits in 1 MiB
    from pathlib import Path

    instance = Path("/work/shared/data/minimalloc-challenging/A.1048576.csv")
    if not instance.is_file():
        pytest.skip("MiniMalloc's challenging instances are not on this machine")
    assert main(["plan", str(instance), "--capacity", "1048576", "--time-limit", "3", "--json",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fits"] and summary["best"]["strategy"] == "search"

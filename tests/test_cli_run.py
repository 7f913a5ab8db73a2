"""`memtile run`: JSON keys and values, allocator preloading, report section, bad arguments."""

import json

import pytest
import torch

from memtile import zoo
from memtile.cli import main
from memtile.commands import run as run_command

KEYS = {"eager_ms", "planned_ms", "eager_p95_ms", "planned_p95_ms", "arena_bytes",
        "eager_peak_bytes", "planned_peak_bytes", "max_abs_diff", "unplanned_ops"}


def run_json(capsys, *argv) -> dict:
    assert main(["run", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_compares_eager_and_planned(capsys):
    summary = run_json(capsys, "resnet8_cifar", "--iters", "3", "--threads", "2")
    assert KEYS <= summary.keys()
    # convolutions planned in channels_last: eager's values up to rounding (see test_runtime)
    assert 0 < summary["max_rel_diff"] <= 1e-5 and summary["layout"] == "auto"
    assert summary["packed_weight_bytes"] > 0 and summary["pack_weights"] is True
    assert summary["threads"] == 2 and summary["allocator"] == "glibc"
    assert summary["planned_peak_bytes"] >= summary["arena_bytes"] > 0
    assert summary["eager_p95_ms"] >= summary["eager_ms"] > 0
    assert summary["planned_p95_ms"] >= summary["planned_ms"] > 0
    assert summary["unplanned_ops"] == []
    assert summary["slot_allocator"] == {"installed": True, "reason": None}


def test_eager_layout_planned_is_bit_exact_with_convolutions_unplanned(capsys):
    summary = run_json(capsys, "resnet8_cifar", "--iters", "2", "--layout", "eager")
    assert summary["max_abs_diff"] == 0.0 and summary["packed_weight_bytes"] == 0
    ops = {entry["op"] for entry in summary["unplanned_ops"]}
    assert "aten.convolution.default" in ops and "aten.relu.default" not in ops


def test_eager_channels_last_is_compared_with_planned_channels_last(capsys):
    """Eager in channels_last sums convolutions as the planned module does: equal outputs up to
    rounding of the same order, and the same KEYS."""
    summary = run_json(capsys, "resnet8_cifar", "--iters", "2", "--eager-layout", "channels_last")
    assert summary["eager_layout"] == "channels_last"
    assert summary["max_rel_diff"] <= 1e-5
    assert summary["eager_peak_bytes"] > 0


def test_fusion_counts_and_no_fuse(capsys):
    """resnet8_cifar: each of its 7 batch norms follows a convolution and is folded into it, each
    of its 3 residual adds runs inside a convolution's call (its ReLUs apart); --no-fuse runs all
    as steps of their own. Both match eager up to the convolution's rounding."""
    model, _ = zoo.get("resnet8_cifar")
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    fused = run_json(capsys, "resnet8_cifar", "--iters", "2")
    assert fused["fuse"] is True
    assert fused["fused"] == {"batch_norm": batch_norms, "add": 3, "activation": 0}  # ReLUs apart
    assert batch_norms == 7
    apart = run_json(capsys, "resnet8_cifar", "--iters", "2", "--no-fuse")
    assert apart["fuse"] is False and apart["fused"] == {"batch_norm": 0, "add": 0, "activation": 0}
    assert fused["max_rel_diff"] <= 1e-5 and apart["max_rel_diff"] <= 1e-5


def test_no_pack_weights_holds_no_packed_copy(capsys):
    """--no-pack-weights: no packed copy held (oneDNN reorders each weight at every call); the
    first convolution (NCHW model input) then allocates more than its output and runs
    unplanned; the outputs are eager's up to the convolution's rounding."""
    summary = run_json(capsys, "resnet8_cifar", "--iters", "2", "--no-pack-weights")
    assert summary["pack_weights"] is False and summary["packed_weight_bytes"] == 0
    assert [entry["op"] for entry in summary["unplanned_ops"]] == ["aten.convolution.default"]
    assert "allocates as much as its output" in summary["unplanned_ops"][0]["reason"]
    assert summary["max_rel_diff"] <= 1e-5


@pytest.mark.skipif(not any(run_command.allocator_library_or_none(n) for n in ("jemalloc",)),
                    reason="libjemalloc2 is not installed")
def test_allocator_is_preloaded_in_a_child(capfd):
    assert main(["run", "ds_cnn_kws", "--iters", "2", "--allocator", "jemalloc", "--json"]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert summary["allocator"] == "jemalloc" and summary["allocator_loaded"] is True
    assert summary["max_rel_diff"] <= 1e-5


def test_missing_allocator_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run_command, "LIBRARY_DIRS", (str(tmp_path),))
    monkeypatch.delenv(run_command.ACTIVE, raising=False)
    assert main(["run", "ds_cnn_kws", "--allocator", "tcmalloc"]) == 2
    assert "apt-get install libtcmalloc-minimal4" in capsys.readouterr().err


def test_bad_thread_count_is_an_error(capsys):
    assert main(["run", "ds_cnn_kws", "--threads", "0"]) == 2
    assert "--threads and --iters must be at least 1" in capsys.readouterr().err


def test_report_section_has_the_comparison(tmp_path):
    model, inputs = zoo.get("resnet8_cifar")
    text = run_command.report_section("resnet8_cifar", model, inputs, tmp_path)
    assert "| median ms per call |" in text and "| measured peak |" in text
    assert "Outputs differ by at most " in text and "- none" in text  # every op planned


def test_a_wrong_planned_output_exits_1(capsys, monkeypatch):
    """A planned result off by 1e-3 (a broken kernel) is no rounding: exit 1, not 0."""
    from memtile.runtime import PlannedModule

    call = PlannedModule.__call__
    monkeypatch.setattr(PlannedModule, "__call__", lambda self, *a: call(self, *a) * 1.001)
    assert main(["run", "resnet8_cifar", "--iters", "1", "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["equivalent"] is False and summary["float64_rel_diff"] > 1e-4
    assert "beyond float32 rounding" in captured.err

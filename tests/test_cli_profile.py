import json
import subprocess
import sys

import pytest

from memtile.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_profile_json_keys_and_timeline(tmp_path, capsys):
    assert main(["profile", "resnet8_cifar", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"model", "mode", "measured_peak_bytes", "load_bytes", "parameter_bytes", "top"} <= set(result)
    assert result["mode"] == "inference" and result["model"] == "resnet8_cifar"
    assert result["measured_peak_bytes"] >= result["load_bytes"] > 0
    # MemoMalloc's offline plan of the recorded trace: at least the measured peak (its LOAD)
    assert result["measured_peak_bytes"] <= result["trace_plan_bytes"] <= 1.25 * result[
        "measured_peak_bytes"]
    assert all({"op", "module", "bytes"} <= set(entry) for entry in result["top"])
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_profile_training_splits_the_peak(tmp_path, capsys):
    assert main(["profile", "resnet8_cifar", "--train", "--batch", "2", "--json", "--out",
                 str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "training"
    split = result["breakdown"]
    assert split["gradients"] + split["optimizer_state"] + split["activations"] == result[
        "measured_peak_bytes"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "resnet19"], "unknown model 'resnet19'; closest: resnet18"),
        (["profile", "resnet8_cifar", "--input-shape", "1,32,32"], "cannot run on inputs"),
        (["profile", "tests_models:data_dependent"], "torch.export cannot trace"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in _error_line(capsys)


def test_unwritable_out_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["profile", "resnet8_cifar", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to --out" in _error_line(capsys)


def test_console_script_runs():
    done = subprocess.run(
        [sys.executable, "-m", "memtile.cli", "profile", "resnet19"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "closest: resnet18" in done.stderr

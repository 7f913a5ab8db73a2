import json

import pytest

from memtile.cli import main
from memtile.planning import STRATEGIES, Buffer, Plan, Problem, verify
from memtile.planning.io import read_csv_offsets

# a: 1 byte on [0,1); b: 1 byte on [0,2); c: 2 bytes on [1,2). LOAD 3 at step 1. First-fit in
# start order puts a at 0, b at 1, then c cannot sit below b: arena 4. The optimum is 3
# (b at 0, a and c at 1).
FRAGMENTING = "id,lower,upper,size\n0,0,1,1\n1,0,2,1\n2,1,2,2\n"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _csv(tmp_path, text: str = FRAGMENTING):
    path = tmp_path / "problem.csv"
    path.write_text(text)
    return path


def _plan(argv, capsys) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_model_plan_json_files_and_verified_plan(tmp_path, capsys):
    code, result = _plan(["resnet8_cifar", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert [r["strategy"] for r in result["results"]] == [*STRATEGIES, "optimal"]
    arenas = [r["arena_bytes"] for r in result["results"]]
    assert result["best"]["arena_bytes"] == min(arenas)
    assert result["load_bytes"] <= min(arenas) <= max(arenas) <= result["naive_bytes"]
    assert result["results"][0]["arena_bytes"] == result["naive_bytes"]  # naive: no reuse
    assert result["load_bytes"] <= result["exported_load_bytes"]
    assert result["inplace_pairs"] > 0 and result["fits"]
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert (saved["arena_bytes"], saved["alignment"]) == (result["best"]["arena_bytes"], 64)
    assert len(saved["buffers"]) == result["buffers"]
    problem = Problem([Buffer(b["id"], b["size"], b["start"], b["end"]) for b in saved["buffers"]])
    verify(problem, Plan({b["id"]: b["offset"] for b in saved["buffers"]}, saved["arena_bytes"], "x"))
    assert (tmp_path / "memory_map.png").stat().st_size > 10_000
    assert result["memory_map_png"] == str(tmp_path / "memory_map.png")


def test_no_schedule_no_inplace_plans_the_exported_graph(tmp_path, capsys):
    code, result = _plan(["resnet8_cifar", "--no-schedule", "--no-inplace", "--strategy",
                          "best", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert result["load_bytes"] == result["exported_load_bytes"]
    assert result["inplace_pairs"] == 0 and "schedule" not in result
    assert [r["strategy"] for r in result["results"]] == [result["best"]["strategy"]]


def test_csv_plan_writes_the_solution_csv(tmp_path, capsys):
    code, result = _plan([str(_csv(tmp_path)), "--strategy", "optimal", "--out",
                          str(tmp_path / "out")], capsys)
    assert code == 0
    assert (result["buffers"], result["load_bytes"], result["naive_bytes"]) == (3, 3, 4)
    assert result["best"] == result["results"][0]
    assert (result["best"]["arena_bytes"], result["best"]["optimal"]) == (3, True)
    offsets = read_csv_offsets(tmp_path / "out" / "problem.solution.csv")
    assert offsets == {b["id"]: b["offset"] for b in json.loads(
        (tmp_path / "out" / "plan.json").read_text())["buffers"]}
    assert offsets[1] in (0, 2) and offsets[2] == 1 - offsets[1] // 2  # b on an edge, c beside


def test_all_strategies_table(tmp_path, capsys):
    assert main(["plan", str(_csv(tmp_path)), "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for name in [*STRATEGIES, "optimal", "LOAD 3 B", "naive 4 B", "+33.3%", "proven"]:
        assert name in err


def test_capacity_exit_codes(tmp_path, capsys):
    path = str(_csv(tmp_path))
    code, result = _plan([path, "--strategy", "first_fit", "--capacity", "3", "--out",
                          str(tmp_path)], capsys)
    assert (code, result["best"]["arena_bytes"], result["fits"]) == (1, 4, False)
    code, result = _plan([path, "--strategy", "optimal", "--capacity", "3", "--out",
                          str(tmp_path)], capsys)
    assert (code, result["best"]["arena_bytes"], result["fits"]) == (0, 3, True)
    assert main(["plan", path, "--capacity", "2", "--out", str(tmp_path)]) == 1
    line = _error_line(capsys)
    assert "below the lower bound LOAD" in line and "2 bytes" in line


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,lower,size\n0,0,4\n", "lacks column(s) upper"),
        ("id,lower,upper,size\n0,0,2,-5\n", "negative size -5"),
        ("id,lower,upper,size\n0,3,3,8\n", "end > start"),
        ("id,lower,upper,size\n0,x,3,8\n", "must be an integer"),
    ],
)
def test_bad_csv_is_one_line_exit_2(tmp_path, capsys, text, message):
    assert main(["plan", str(_csv(tmp_path, text)), "--out", str(tmp_path)]) == 2
    assert message in _error_line(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "nope"], "unknown --strategy 'nope'"),
        (["--capacity", "lots"], "cannot read 'lots' as a byte size"),
    ],
)
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main(["plan", str(_csv(tmp_path)), *argv, "--out", str(tmp_path)]) == 2
    assert message in _error_line(capsys)


def test_missing_csv_is_one_line_exit_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "absent.csv"), "--out", str(tmp_path)]) == 2
    assert "absent.csv" in _error_line(capsys)


def test_report_section_states_the_planned_numbers(tmp_path):
    from memtile import zoo
    from memtile.capture import capture
    from memtile.commands.plan import prepare_graph, report_section
    from memtile.planning import lower_bound, naive_bytes
    from memtile.units import format_bytes

    model, inputs = zoo.get("resnet8_cifar")
    text = report_section("resnet8_cifar", model, inputs, tmp_path)
    problem = prepare_graph(capture(model, inputs), "resnet8_cifar").problem
    assert f"| naive (every buffer its own bytes) | {format_bytes(naive_bytes(problem))} |" in text
    assert f"in-place ops | {format_bytes(lower_bound(problem))} |" in text
    assert "![memory map](memory_map.png)" in text
    assert (tmp_path / "memory_map.png").stat().st_size > 10_000

"""memtile.peers and `memtile run --peers`: four runners in one process, their peaks and
outputs; ORT's arena statistics; a clear error without onnxruntime; interleaved timing threads."""

import ctypes
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from memtile import zoo
from memtile.cli import main
from memtile.errors import MemtileError
from memtile.peers import ANCHOR, INSTALL, RUNNERS, Peers, arena_statistics, import_onnxruntime
from memtile.timing import interleaved

RESULT_KEYS = {"median_ms", "p95_ms", "peak_bytes", "peak_source", "max_rel_diff",
               "build_seconds", f"vs_{ANCHOR}", "cpu_ms", f"cpu_vs_{ANCHOR}"}


def _ort_missing() -> str | None:
    try:
        import_onnxruntime()
    except Exception as error:  # noqa: BLE001 - any failure to import is a skip reason
        return str(error)
    return None


def check_comparison(result: dict, threads: int, iters: int) -> None:
    """Every runner timed, measured and compared with eager, or skipped with its reason."""
    assert result["threads"] == threads and result["iters"] == iters
    assert set(result["runners"]) | set(result["skipped"]) == set(RUNNERS)
    assert "eager" in result["runners"] and "planned" in result["runners"]
    missing = _ort_missing()
    if missing is None:
        assert ANCHOR in result["runners"]
    else:
        assert INSTALL in result["skipped"][ANCHOR]
    for name, r in result["runners"].items():
        assert RESULT_KEYS <= r.keys(), name
        assert r["p95_ms"] >= r["median_ms"] > 0
        # CPU time of the calling thread: the whole work at 1 thread, not defined at more
        assert (r["cpu_ms"] > 0) if threads == 1 else (r["cpu_ms"] is None), name
        assert r["max_rel_diff"] <= 1e-5, name  # eager's outputs up to rounding
        assert r["peak_bytes"] > 0, name
    for reason in result["skipped"].values():
        assert reason  # a skipped runner says why
    if ANCHOR in result["runners"]:
        ort = result["runners"][ANCHOR]
        assert ort["vs_onnxruntime"] == 1.0 and ort["peak_source"] == "ort-arena-profile"
        assert ort["exporter"] in ("dynamo", "torchscript")
        assert ort["arena_held_bytes"] >= ort["peak_bytes"]
    planned = result["runners"]["planned"]
    assert planned["peak_source"] == "arena+allocator"


def test_peers_times_and_measures_every_runner():
    model, inputs = zoo.get("resnet8_cifar")
    result = Peers(model, inputs).compare(threads=1, iters=2)
    check_comparison(result, threads=1, iters=2)
    # the planned arena holds less than eager allocates per call (resnet8: 768 KiB vs 148 KiB)
    assert result["runners"]["planned"]["peak_bytes"] < result["runners"]["eager"]["peak_bytes"]


def test_run_peers_json(capsys):
    assert main(["run", "resnet8_cifar", "--peers", "--iters", "2", "--threads", "2",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"model", "batch", "input_shape", "allocator", "anchor", "runners",
            "skipped"} <= summary.keys()
    assert summary["model"] == "resnet8_cifar" and summary["anchor"] == ANCHOR
    check_comparison(summary, threads=2, iters=2)


def test_without_onnxruntime_the_runner_is_skipped_and_the_cli_says_how(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    model, inputs = zoo.get("ds_cnn_kws")
    peers = Peers(model, inputs, ("eager", ANCHOR))
    assert INSTALL in peers.skipped[ANCHOR] and ANCHOR not in peers.runners
    assert main(["run", "ds_cnn_kws", "--peers"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and INSTALL in error


def test_unknown_runner_is_an_error():
    model, inputs = zoo.get("ds_cnn_kws")
    with pytest.raises(MemtileError, match="runners must include eager"):
        Peers(model, inputs, ("planned", "tvm"))


def _node(ts: int, in_use: int, delta: int, peak: int, held: int, held_delta: int = 0) -> dict:
    return {"cat": "Node", "ts": ts, "args": {
        "mem_bytes_in_use": str(in_use), "mem_in_use_delta": str(delta),
        "mem_in_use_peak": str(peak), "mem_arena_held": str(held),
        "mem_arena_held_delta": str(held_delta)}}


def test_arena_statistics_count_the_runs_not_the_session_creation():
    """5 MB in use before the first call; a lifetime peak of 20 MB reached while the session was
    created is not the calls': they reach 9 MB, 4 MB above it. A lifetime peak that rises
    during the calls (inside a node, past what any node ended with) is theirs."""
    mb = 1 << 20
    events = [
        {"cat": "Session", "ts": 0, "name": "model_run", "args": {}},
        _node(3, 7 * mb, 2 * mb, 20 * mb, 8 * mb, 2 * mb),
        _node(1, 7 * mb, 2 * mb, 20 * mb, 8 * mb, 2 * mb),  # unordered: sorted by ts
        _node(4, 9 * mb, 2 * mb, 20 * mb, 12 * mb, 4 * mb),
    ]
    assert arena_statistics(events) == {"peak_bytes": 4 * mb, "arena_held_bytes": 6 * mb}
    events.append(_node(5, 9 * mb, 0, 21 * mb, 12 * mb))  # a new lifetime peak: the runs'
    assert arena_statistics(events)["peak_bytes"] == 16 * mb
    fresh = [_node(1, 7 * mb, 2 * mb, 7 * mb, 8 * mb, 2 * mb), _node(2, 6 * mb, -mb, 11 * mb, 8 * mb)]
    assert arena_statistics(fresh)["peak_bytes"] == 6 * mb
    assert arena_statistics([]) == {"peak_bytes": None, "arena_held_bytes": None}


def _libgomp():
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    paths = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    return ctypes.CDLL(min(paths)) if paths else None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 1 thread from the default")
def test_interleaved_threads_run_openmp_with_the_callers_thread_count():
    """A new thread's OpenMP starts at the machine's default, and oneDNN convolutions read it
    directly: each timing thread must take the caller's intra-op count first."""
    libgomp = _libgomp()
    if libgomp is None:
        pytest.skip("torch is not built with GNU OpenMP")
    seen = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        interleaved([lambda: seen.append(libgomp.omp_get_max_threads())], (), threads=2, iters=1)
    finally:
        torch.set_num_threads(previous)
    assert seen and set(seen) == {1}

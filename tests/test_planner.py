import memtile
from memtile import zoo
from memtile.capture import capture
from memtile.lifetimes import load
from memtile.planner import prepare
from memtile.planning import lower_bound, verify


def test_memtile_plan_is_the_shared_pipeline():
    model, inputs = zoo.get("resnet18")
    result = memtile.plan(model, inputs)
    verify(result.problem, result.plan)
    # in-place relu/add/batch norm: conv1 output + maxpool output and its int64 indices
    assert result.arena_bytes == lower_bound(result.problem) == 64 * 112 * 112 * 4 + 64 * 56 * 56 * 12
    plain = memtile.plan(model, inputs, reorder=False, inplace=False)
    assert plain.arena_bytes == load(capture(model, inputs)) == 2 * 64 * 112 * 112 * 4
    assert result.prepared.inplace_count > 0 and plain.prepared.inplace_count == 0


def test_prepare_narrows_the_problem_to_what_a_caller_plans():
    """A given order skips the schedule; `keep_pair` drops in-place pairs (each dropped pair is
    one buffer more), `extra_shared` adds pairs as if found in place, `storages` keeps only the
    named buffers: the executor's arena is built this way."""
    graph = capture(*zoo.get("resnet18", input_shape=(3, 32, 32)))
    full = prepare(graph)
    again = prepare(graph, order=full.order)
    assert again.schedule is None and full.schedule is not None
    assert (again.order, again.shared, again.problem) == (full.order, full.shared, full.problem)
    assert len(full.shared) > 2
    some = dict(list(full.shared.items())[::2])
    kept = prepare(graph, order=full.order, keep_pair=lambda output, source: output in some)
    assert kept.shared == some and kept.inplace_count == len(some)
    assert len(kept.problem.buffers) == len(full.problem.buffers) + len(full.shared) - len(some)
    given = prepare(graph, order=full.order, keep_pair=lambda *_: False, extra_shared=some)
    assert given.inplace_count == 0 and given.problem == kept.problem
    named = {b.id for b in full.problem.buffers[::3]}
    narrowed = prepare(graph, order=full.order, storages=named)
    assert narrowed.problem.buffers == [b for b in full.problem.buffers if b.id in named]

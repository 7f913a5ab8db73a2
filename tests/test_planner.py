import memtile
from memtile import zoo
from memtile.capture import capture
from memtile.lifetimes import load
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


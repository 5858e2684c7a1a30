"""The benchmark's machinery on tiny sizes, and the shared policy step's equality with the naive
one through train.py's real step (no timings are checked)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2net_jax import bench


def test_smoke_suite_reports_latency_uniqueness_and_convs_as_json_and_a_table():
    results = bench.run("smoke", parts=("latency", "uniqueness", "convs"))
    json.dumps(results)  # Serialisable as written by --json.
    assert results["device"]["device_kind"]
    latency = results["latency"]
    assert set(latency["latency_ms"]) >= {"full_resnet", "skipping_half", "m2net_half"}
    assert 0.5 <= latency["pr"] <= 0.6
    # FLOPs-predicted: full / (fixed + kept blocks); the half policy keeps 5 of 9 blocks.
    assert 1.0 < latency["recognizer_speedup"]["predicted"] < 9 / 5
    rows = results["uniqueness"]["rows"]
    assert [row["M"] for row in rows] == [256, 1024]
    for row in rows:  # The O(M·N) counts agree with the pairwise definition.
        assert row["max_difference"] < 1e-6
    cases = results["convs"]["cases"]
    assert set(cases) == {"grouped 1x1, G=4", "depthwise 3x3", "HetConv 3x3, P=4"}
    assert all(row["ms"]["ours"] > 0 and row["ms"]["dense"] > 0 for row in cases.values())
    table = bench.format_table(results)
    assert "speedup over the full ResNet" in table and "uniqueness" in table
    assert "compact convs" in table


def test_pairwise_uniqueness_is_eqn_2():
    policies = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 0]], np.float32)
    # Row 0 differs from row 1 in 1 block and from row 2 in 2: (0 + 1 + 2) / (3 · 3).
    expected = [3 / 9, (1 + 0 + 3) / 9, (2 + 3 + 0) / 9]
    np.testing.assert_allclose(bench.pairwise_uniqueness(policies), expected, rtol=1e-6)


def test_unknown_suite_or_part_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown suite"):
        bench.run("huge")
    with pytest.raises(ValueError, match="Unknown parts"):
        bench.run("smoke", parts=("latency", "speed"))


@pytest.mark.slow
def test_shared_policy_step_gives_the_naive_steps_loss_and_update():
    """The policy stage's real train step (steps.make_train_step), with the frozen recognizer's
    two forwards shared, reaches the same loss, metrics and parameters as with two forwards."""
    tb = bench.TrainBench(bench.SUITES["smoke"], mesh=bench_mesh())
    steps = tb.policy_steps()
    k = 4  # The first 5 of 9 blocks are forced on: a shared prefix, then separate streams.
    new = {variant: step(tb.state_at("policy", k), tb.batch) for variant, step in steps.items()}
    (naive_state, naive_scalars), (shared_state, shared_scalars) = new["naive"], new["shared"]
    assert float(naive_scalars["curriculum_k"]) == k
    for name, value in naive_scalars.items():
        np.testing.assert_allclose(shared_scalars[name], value, rtol=1e-6, atol=1e-7)
    for a, b in zip(
        jax.tree.leaves(naive_state.params), jax.tree.leaves(shared_state.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def bench_mesh():
    from m2net_jax import steps

    return steps.make_mesh(jax.devices()[:2])  # Two devices: the shard_map split is exercised.


def test_pipeline_part_times_each_worker_count_and_the_in_memory_source(smoke_data_dir):
    results = bench.run("smoke", parts=("pipeline",), data_dir=smoke_data_dir)
    rows = results["pipeline"]["rows"]
    assert [(row["source"], row["worker_count"]) for row in rows] == [
        ("disk", 0),
        ("disk", 1),
        ("memory", 0),
    ]
    assert all(row["images_per_s"] > 0 for row in rows)
    table = bench.format_table(results)
    assert "1 worker" in table and "memory" in table and "in-process" in table


def test_a_warm_compile_is_served_from_the_persistent_cache():
    # The test session's persistent cache is on (conftest); a program new to it.
    x = jnp.arange(24.0).reshape(4, 6)

    def program():
        return jax.jit(lambda a: jnp.tanh(a) @ a.T + 7.25).lower(x).compile()

    compiled, times = bench.compile_cold_and_warm(program)
    assert times["warm_cache_hits"] >= 1
    assert times["cold_s"] > 0 and times["warm_s"] > 0
    np.testing.assert_allclose(compiled(x), np.tanh(x) @ np.asarray(x).T + 7.25, rtol=1e-5)

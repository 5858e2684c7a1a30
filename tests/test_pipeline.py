"""Tests for the grain input pipeline (m2net_jax/data/pipeline.py)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from m2net_jax.data import geo_twins, pipeline

SMOKE = "geo_twins/smoke"
KEYS = ("image", "policy_image", "location", "label", "mask", "index")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    geo_twins.build(SMOKE, data_dir=path)
    return path


@pytest.fixture(scope="module")
def source(data_dir):
    """The stored examples, decoded by TFDS (independently of the pipeline's decoding)."""
    builder = tfds.builder(SMOKE, data_dir=data_dir)
    return {split: list(builder.as_data_source(split)) for split in ("train", "test")}


def train_iterator(data_dir, **kwargs):
    defaults = dict(image_size=32, batch_size=8, seed=3, shard_index=0, shard_count=1)
    return pipeline.make_train_iterator(SMOKE, data_dir=data_dir, **{**defaults, **kwargs})


def assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual, strict=True):
        assert sorted(want) == sorted(got)
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_train_batch_has_documented_shapes_dtypes_and_ranges(data_dir):
    batch = next(train_iterator(data_dir, batch_size=6))
    assert sorted(batch) == sorted(KEYS)
    assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["policy_image"].shape == (6, 16, 16, 3)
    assert batch["policy_image"].dtype == np.float32
    assert batch["location"].shape == (6, 8) and batch["location"].dtype == np.float32
    assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
    assert batch["mask"].dtype == np.bool_ and batch["mask"].all()
    for key in ("image", "policy_image"):
        assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0


def test_policy_image_is_the_2x2_average_of_the_image(data_dir):
    batch = next(train_iterator(data_dir))
    image = batch["image"].astype(np.float64)
    expected = (
        image[:, 0::2, 0::2] + image[:, 1::2, 0::2] + image[:, 0::2, 1::2] + image[:, 1::2, 1::2]
    ) / 4
    np.testing.assert_allclose(batch["policy_image"], expected, atol=1e-6)


def test_batches_carry_the_label_and_location_of_their_example(data_dir, source):
    batch = next(train_iterator(data_dir, batch_size=16))
    for i, index in enumerate(batch["index"]):
        example = source["train"][index]
        assert batch["label"][i] == example["label"]
        np.testing.assert_array_equal(batch["location"][i], example["location"])


def test_two_processes_read_the_halves_of_the_one_process_global_batches(data_dir, source):
    num_train = len(source["train"])
    global_batch = 16
    steps = num_train // global_batch  # One epoch: 8 global batches.
    one = train_iterator(data_dir, shard_index=0, shard_count=1, batch_size=global_batch)
    halves = [
        train_iterator(data_dir, shard_index=p, shard_count=2, batch_size=global_batch // 2)
        for p in (0, 1)
    ]
    seen = []
    for _ in range(steps):
        whole = next(one)
        parts = [next(it) for it in halves]
        for key in whole:  # Same photos, same crops, same row order.
            joined = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(joined, whole[key], err_msg=key)
        assert not set(parts[0]["index"]) & set(parts[1]["index"])
        seen.extend(whole["index"])
    # An epoch is a permutation of the split, and the next epoch another one.
    assert sorted(seen) == list(range(num_train))
    assert list(next(one)["index"]) != seen[:global_batch]


@pytest.mark.parametrize("worker_count", [0, 2])
def test_restored_iterator_yields_the_batches_of_an_uninterrupted_one(data_dir, worker_count):
    # 128 examples, batch 8: 16 batches an epoch; stop at 13 so the comparison crosses an epoch.
    it = train_iterator(data_dir, batch_size=8, worker_count=worker_count)
    for _ in range(13):
        next(it)
    state = it.get_state()
    uninterrupted = [next(it) for _ in range(6)]
    it.close()

    restored = train_iterator(data_dir, batch_size=8, worker_count=worker_count)
    restored.set_state(state)
    resumed = [next(restored) for _ in range(6)]
    restored.close()
    assert_same_batches(uninterrupted, resumed)


def test_iterator_state_round_trips_through_an_orbax_checkpoint(data_dir, tmp_path):
    it = train_iterator(data_dir)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    uninterrupted = [next(it) for _ in range(3)]

    fresh = train_iterator(data_dir)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(
            5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
        )["data"]
    assert_same_batches(uninterrupted, [next(restored) for _ in range(3)])


def test_eval_counts_every_example_once_with_equal_steps_per_process(data_dir, source):
    num_test, batch_size, shard_count = len(source["test"]), 10, 3
    shards = [
        list(
            pipeline.make_eval_iterator(
                SMOKE,
                data_dir=data_dir,
                image_size=32,
                batch_size=batch_size,
                shard_index=shard_index,
                shard_count=shard_count,
            )
        )
        for shard_index in range(shard_count)
    ]
    # ceil(ceil(64 / 3) / 10) = 3 batches on every process.
    assert [len(batches) for batches in shards] == [3, 3, 3]
    batches = [b for shard in shards for b in shard]
    assert all(b["image"].shape == (batch_size, 32, 32, 3) for b in batches)
    assert sum(int(b["mask"].sum()) for b in batches) == num_test
    counted = np.concatenate([b["index"][b["mask"]] for b in batches])
    assert sorted(counted) == list(range(num_test))


def test_eval_single_process_pads_only_the_last_batch(data_dir, source):
    batches = list(
        pipeline.make_eval_iterator(
            SMOKE, data_dir=data_dir, image_size=32, batch_size=10, shard_index=0, shard_count=1
        )
    )
    masks = [int(b["mask"].sum()) for b in batches]
    assert masks == [10] * 6 + [len(source["test"]) - 60]


def test_eval_image_at_stored_resolution_is_the_stored_photo(data_dir, source):
    batch = next(
        pipeline.make_eval_iterator(
            SMOKE, data_dir=data_dir, image_size=32, batch_size=4, shard_index=0, shard_count=1
        )
    )
    for i, index in enumerate(batch["index"]):
        stored = source["test"][index]["image"].astype(np.float32) / 255.0
        np.testing.assert_allclose(batch["image"][i], stored, atol=1e-6)


def test_missing_dataset_error_names_the_build_command(tmp_path):
    empty = str(tmp_path)
    expected = f"python -m m2net_jax.data.build --dataset=geo_twins/64px --data_dir={empty}"
    with pytest.raises(pipeline.DatasetNotBuiltError) as error:
        pipeline.dataset_info("geo_twins/64px", data_dir=empty)
    assert expected in str(error.value)
    with pytest.raises(pipeline.DatasetNotBuiltError, match="m2net_jax.data.build"):
        train_iterator(empty)
    with pytest.raises(pipeline.DatasetNotBuiltError, match="m2net_jax.data.build"):
        pipeline.ensure_built("geo_twins/smoke", data_dir=empty)


def test_ensure_built_builds_geo_twins_when_allowed(tmp_path, source):
    spec = pipeline.ensure_built(SMOKE, data_dir=str(tmp_path), build_if_missing=True)
    assert spec.name == SMOKE
    assert spec.num_examples == {"train": len(source["train"]), "test": len(source["test"])}
    assert spec.num_classes == len(spec.class_names) == 8
    assert spec.image_size == 32
    assert all("@" in name for name in spec.class_names)


# A process in which TensorFlow cannot be imported, as on a machine that has JAX and little else.
_WITHOUT_TENSORFLOW = """
import importlib.abc
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, NoTensorFlow())
try:
    import tensorflow
except ImportError:
    pass
else:
    raise SystemExit("tensorflow is still importable")
"""

# Reads a built dataset the way training and evaluation do: spec, training and eval batches.
_READ = """
import dataclasses
import json
import sys

import numpy as np

from m2net_jax.data import pipeline

dataset, data_dir, out = sys.argv[1:]
spec = pipeline.dataset_info(dataset, data_dir=data_dir)
assert pipeline.ensure_built(dataset, data_dir=data_dir, build_if_missing=True) == spec
sizes = dict(image_size=32, batch_size=8, shard_index=0, shard_count=1)
train = pipeline.make_train_iterator(dataset, data_dir=data_dir, seed=5, **sizes)
batches = {f"train{step}": next(train) for step in range(20)}  # more than one epoch (16)
for step, batch in enumerate(pipeline.make_eval_iterator(dataset, data_dir=data_dir, **sizes)):
    batches[f"eval{step}"] = batch
arrays = {f"{name}/{key}": value for name, batch in batches.items() for key, value in batch.items()}
np.savez(out, spec=json.dumps(dataclasses.asdict(spec)), **arrays)
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "tensorflow")
print("tensorflow modules:", loaded)
"""


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        # etils asks `importlib.util.find_spec("tensorflow")` whether TF is installed, which is
        # None on a machine without it but an error under the finder above; this is the answer
        # such a machine gets (only the backend of gs:// and s3:// paths depends on it).
        "EPATH_USE_TF": "false",
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )


def test_built_dataset_reads_the_same_batches_in_a_process_without_tensorflow(data_dir, tmp_path):
    outputs = {}
    for name, prefix in (("normal", ""), ("without_tensorflow", _WITHOUT_TENSORFLOW)):
        out = tmp_path / f"{name}.npz"
        result = _run_python(prefix + _READ, SMOKE, data_dir, str(out))
        assert result.returncode == 0, result.stderr[-4000:]
        if prefix:
            assert "tensorflow modules: []" in result.stdout
        outputs[name] = dict(np.load(out))
    normal, without = outputs["normal"], outputs["without_tensorflow"]
    assert json.loads(str(without["spec"])) == json.loads(str(normal["spec"]))
    assert json.loads(str(normal["spec"]))["num_examples"] == {"train": 128, "test": 64}
    assert sorted(without) == sorted(normal)
    assert len(normal) == 1 + 6 * (20 + 8)  # spec; 6 keys of 20 train and 8 eval batches
    for key in normal:
        np.testing.assert_array_equal(without[key], normal[key], err_msg=key)


def test_geo_twins_builds_byte_identical_files_without_tensorflow(data_dir, tmp_path):
    build = (
        "from m2net_jax.data import geo_twins; geo_twins.build(sys.argv[1], data_dir=sys.argv[2])"
    )
    result = _run_python(_WITHOUT_TENSORFLOW + build, SMOKE, str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    expected = sorted(pathlib.Path(data_dir, "geo_twins", "smoke").rglob("*.array_record*"))
    written = sorted((tmp_path / "geo_twins" / "smoke").rglob("*.array_record*"))
    assert [p.name for p in written] == [p.name for p in expected] and written
    for a, b in zip(expected, written, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.parametrize("worker_count", [0, 2])
def test_in_memory_train_batches_equal_the_on_disk_ones_across_epochs_and_a_restore(
    data_dir, worker_count
):
    # 16 batches an epoch: 20 batches cross into the second epoch's reshuffle and new crops.
    on_disk = train_iterator(data_dir, cache_in_memory_mb=0)
    expected = [next(on_disk) for _ in range(20)]
    on_disk.close()
    in_memory = train_iterator(data_dir, cache_in_memory_mb=1, worker_count=worker_count)
    assert_same_batches(expected[:13], [next(in_memory) for _ in range(13)])
    state = in_memory.get_state()
    in_memory.close()

    restored = train_iterator(data_dir, cache_in_memory_mb=1, worker_count=worker_count)
    restored.set_state(state)
    assert_same_batches(expected[13:], [next(restored) for _ in range(7)])
    restored.close()


def test_in_memory_eval_batches_equal_the_on_disk_ones(data_dir):
    def batches(cache_in_memory_mb):
        it = pipeline.make_eval_iterator(
            SMOKE,
            data_dir=data_dir,
            image_size=32,
            batch_size=24,  # Pads the last batch.
            shard_index=0,
            shard_count=1,
            cache_in_memory_mb=cache_in_memory_mb,
        )
        return list(it)

    assert_same_batches(batches(0), batches(1))


def test_only_splits_within_the_threshold_are_held_in_memory(data_dir):
    size_mb = pipeline.decoded_size_mb(SMOKE, "train", data_dir)
    assert size_mb == pytest.approx(128 * 32 * 32 * 3 / 2**20)
    held = pipeline._source_dataset(SMOKE, "train", data_dir, cache_in_memory_mb=size_mb)
    assert "DecodedSource" in str(held.parents[0])
    read = pipeline._source_dataset(SMOKE, "train", data_dir, cache_in_memory_mb=size_mb / 2)
    assert "DecodedSource" not in str(read.parents[0])
    decoded = pipeline._decoded_source.cache_info().misses
    pipeline._source_dataset(SMOKE, "train", data_dir, cache_in_memory_mb=size_mb)
    assert pipeline._decoded_source.cache_info().misses == decoded  # Decoded once per process.


def _garble(path: pathlib.Path, offset: int, length: int = 200) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + length):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("cache_in_memory_mb", [0, 64])
def test_a_damaged_shard_is_a_user_error_naming_the_rebuild_command(
    data_dir, tmp_path, cache_in_memory_mb
):
    from m2net_jax import user_errors
    from m2net_jax.data import build

    damaged = tmp_path / "tfds"
    shutil.copytree(data_dir, damaged)
    (shard,) = damaged.glob("geo_twins/smoke/*/geo_twins-train.array_record-*")
    _garble(shard, offset=shard.stat().st_size // 3)
    with pytest.raises(pipeline.DamagedDatasetError) as error:
        iterator = train_iterator(str(damaged), cache_in_memory_mb=cache_in_memory_mb)
        for _ in range(32):  # two epochs of 16 batches: every record is read
            next(iterator)
    message = user_errors.user_message(error.value)
    assert "geo_twins/smoke (train split" in message and "damaged" in message
    command = f"python -m m2net_jax.data.build --dataset={SMOKE} --data_dir={damaged} --overwrite"
    assert message.endswith(command)

    # The command it names repairs the dataset.
    build.build_dataset(SMOKE, data_dir=str(damaged), overwrite=True)
    pipeline._decoded_source.cache_clear()
    repaired = train_iterator(str(damaged), cache_in_memory_mb=cache_in_memory_mb)
    intact = train_iterator(data_dir)
    assert_same_batches([next(intact) for _ in range(16)], [next(repaired) for _ in range(16)])

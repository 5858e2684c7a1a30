"""The grain input pipeline: TFDS array_record files -> per-process batches of numpy arrays.

One chain for every dataset (geo_twins, landmark420, landmark732):

    tfds data source -> grain.MapDataset -> index each example
      train: shuffle (seeded, reshuffled every epoch) -> repeat forever -> decode
             -> random resized crop -> horizontal flip -> half-resolution policy image
             -> model inputs -> batch -> this process's batches of every global batch
      eval:  shard by JAX process -> pad the shard to a whole number of batches -> decode
             -> resize + centre crop -> half-resolution policy image -> model inputs -> batch
    -> worker processes + prefetch

A batch is the *per-process* share of the global batch, as host-local numpy arrays:

    image         (B, S, S, 3)      float32 in [0, 1]  the recognizer's photo
    policy_image  (B, S/2, S/2, 3)  float32 in [0, 1]  the same crop, 2x2-averaged (§3.3)
    location      (B, 8)            float32            raw DMS vectors (§3.1)
    label         (B,)              int32
    mask          (B,)              bool               False on eval padding
    index         (B,)              int32              the example's position in its split

(B here is the per-process batch; `train.py` turns these into global arrays in one place.)
Batches are formed before the iterator, in the MapDataset, so their content does not depend on
the number of worker processes. The iterator is a `grain.DatasetIterator`: `get_state()` /
`set_state()` and `grain.checkpoint.CheckpointSave/CheckpointRestore` (Orbax) resume it
exactly where it stopped.

Small splits are decoded once: a split whose decoded photos fit in `cache_in_memory_mb` (all of
geo_twins at 32 px, ~15 MB) is read and decoded when first used, kept in host memory for the
process's life (`DecodedSource`), and served from there every epoch and every stage. The chain
is otherwise the same, so it yields exactly the batches of the on-disk source.

Reading needs no TensorFlow: TFDS's array_record data source parses the stored tf.Example
records with its own copy of the proto and images are decoded here with PIL, so training and
evaluation from a built dataset run where `tensorflow` is not installed (tests/test_pipeline.py
checks this in a process that cannot import it).
"""

import dataclasses
import functools
import math
import os

import grain
import jax
import tensorflow_datasets as tfds
from absl import flags

from m2net_jax import user_errors
from m2net_jax.data import geo_twins
from m2net_jax.data.transforms import (  # noqa: F401  (part of this module's API)
    AddIndex,
    AddPolicyImage,
    DecodeImage,
    MarkPadding,
    RandomFlip,
    RandomResizedCrop,
    ResizeCentreCrop,
    ToModelInputs,
)

# Datasets that build themselves (no downloads, seconds); the others need a manual download.
PROCEDURAL_DATASETS = ("geo_twins",)


class DatasetNotBuiltError(user_errors.UserError, FileNotFoundError):
    """The requested TFDS dataset has not been generated in the data directory."""


class DamagedDatasetError(user_errors.UserError, RuntimeError):
    """A record of a built dataset cannot be read (a damaged or truncated file)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the model and the training loop need to know about a built dataset.

    Attributes:
      name: TFDS name with config, e.g. ``geo_twins/32px`` or ``landmark420``.
      data_dir: the TFDS data directory it was found in.
      num_classes: K.
      class_names: the K class names, in label order.
      num_examples: examples per split, e.g. ``{'train': 5120, 'test': 1600}``.
      image_size: stored photo side in pixels, or None when photos have varying sizes.
    """

    name: str
    data_dir: str
    num_classes: int
    class_names: tuple[str, ...]
    num_examples: dict[str, int]
    image_size: int | None


def _dataset_family(dataset: str) -> str:
    return dataset.split("/")[0].split(":")[0]


def build_command(dataset: str, *, data_dir: str | None = None) -> str:
    """The shell command that generates `dataset` (quoted in errors)."""
    command = f"python -m m2net_jax.data.build --dataset={dataset}"
    if data_dir is not None:
        command += f" --data_dir={data_dir}"
    if _dataset_family(dataset) not in PROCEDURAL_DATASETS:
        command += " --manual_dir=<your GLDv2 directory>"
    return command


def _builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"Unknown dataset {dataset!r}: m2net_jax provides geo_twins[/<config>], landmark420 "
            "and landmark732 (import m2net_jax.data to register them)."
        ) from error


def _not_built(dataset: str, builder: tfds.core.DatasetBuilder, data_dir: str | None):
    message = (
        f"Dataset {dataset!r} is not built in {builder.data_dir_root}. Build it with: "
        f"{build_command(dataset, data_dir=data_dir)}"
    )
    if _dataset_family(dataset) in PROCEDURAL_DATASETS:
        message += " (the main training job builds geo_twins automatically when it is missing)."
    return DatasetNotBuiltError(message)


def dataset_info(dataset: str, *, data_dir: str | None = None) -> DatasetSpec:
    """Reads the class count, split sizes and image size of a built dataset.

    Args:
      dataset: TFDS name, optionally with config: ``geo_twins``, ``geo_twins/64px``,
        ``landmark420``, ...
      data_dir: TFDS data directory; None means TFDS's default.

    Raises:
      DatasetNotBuiltError: the dataset is not generated there; the message gives the command
        that builds it.
      ValueError: no such dataset.
    """
    builder = _builder(dataset, data_dir)
    if not builder.is_prepared():
        raise _not_built(dataset, builder, data_dir)
    info = builder.info
    config = builder.builder_config
    label = info.features["label"]
    return DatasetSpec(
        name=f"{builder.name}/{config.name}" if config else builder.name,
        data_dir=str(builder.data_dir_root),
        num_classes=label.num_classes,
        class_names=tuple(label.names),
        num_examples={name: split.num_examples for name, split in info.splits.items()},
        image_size=info.features["image"].shape[0],
    )


def ensure_built(
    dataset: str, *, data_dir: str | None = None, build_if_missing: bool = False
) -> DatasetSpec:
    """Returns the dataset's spec, first generating it if allowed and possible.

    Only procedural datasets (geo_twins) can be built here; the GLDv2 subsets need their manual
    download and raise the error with the build command. In a multi-process job build before
    starting the processes, or on each process into a process-local `data_dir` (geo_twins is
    deterministic, so every process writes the same files).
    """
    builder = _builder(dataset, data_dir)
    if not builder.is_prepared():
        if not (build_if_missing and _dataset_family(dataset) in PROCEDURAL_DATASETS):
            raise _not_built(dataset, builder, data_dir)
        geo_twins.build(dataset, data_dir=data_dir)
    return dataset_info(dataset, data_dir=data_dir)


# ----------------------------------------------------------------------------------------------
# Datasets and iterators.


# Images stay encoded in the TFDS source; `DecodeImage` (PIL) decodes them.
_SKIP_DECODING = tfds.decode.SkipDecoding()


class DecodedSource:
    """A split's examples with their photos decoded ((H, W, 3) uint8, read-only), in memory.

    Random access like the TFDS source it was read from, with the same elements except that
    ``image`` holds pixels instead of encoded bytes.
    """

    def __init__(self, source):
        decode = DecodeImage()
        self._examples = []
        for i in range(len(source)):
            example = decode.map(source[i])
            example["image"].setflags(write=False)  # Shared by every epoch: never modified.
            self._examples.append(example)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index):
        return dict(self._examples[index])

    def __repr__(self) -> str:
        return f"DecodedSource({len(self)} examples)"


class CheckedSource:
    """A TFDS data source whose unreadable records raise `DamagedDatasetError`.

    array_record checks a hash of every block it reads; a damaged file fails there with a
    RuntimeError deep in a worker process. This names the dataset, split and example instead
    and gives the command that rebuilds it.
    """

    def __init__(self, dataset: str, split: str, data_dir: str | None):
        self._dataset, self._split, self._data_dir = dataset, split, data_dir
        builder = _builder(dataset, data_dir)
        self._path = str(builder.data_dir)
        self._source = builder.as_data_source(split, decoders={"image": _SKIP_DECODING})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        try:
            return self._source[index]
        except (RuntimeError, OSError, ValueError) as error:
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise DamagedDatasetError(
                f"Example {index} of {self._dataset} ({self._split} split, in {self._path}) "
                f"cannot be read: {reason}. The dataset's files are damaged; rebuild it with: "
                f"{build_command(self._dataset, data_dir=self._data_dir)} --overwrite"
            ) from error

    def __repr__(self) -> str:
        return f"CheckedSource({self._dataset}, {self._split}, {len(self)} examples)"


# Per process, for its life: every epoch, stage and evaluation of a small split reads one copy.
@functools.lru_cache(maxsize=4)
def _decoded_source(dataset: str, split: str, data_dir: str | None) -> DecodedSource:
    return DecodedSource(CheckedSource(dataset, split, data_dir))


def decoded_size_mb(dataset: str, split: str, data_dir: str | None = None) -> float | None:
    """MB that a split's decoded photos take, or None when the photos' size varies."""
    builder = _builder(dataset, data_dir)
    shape = builder.info.features["image"].shape
    if None in shape:
        return None
    return builder.info.splits[split].num_examples * math.prod(shape) / 2**20


def _source_dataset(
    dataset: str, split: str, data_dir: str | None, cache_in_memory_mb: float = 0
) -> grain.MapDataset:
    builder = _builder(dataset, data_dir)
    if not builder.is_prepared():
        raise _not_built(dataset, builder, data_dir)
    size_mb = decoded_size_mb(dataset, split, data_dir) if cache_in_memory_mb > 0 else None
    if size_mb is not None and size_mb <= cache_in_memory_mb:
        source = _decoded_source(dataset, split, data_dir)
    else:
        # Decoded by `DecodeImage`, in the worker processes, every time it is read.
        source = CheckedSource(dataset, split, data_dir)
    return grain.MapDataset.source(source).map_with_index(AddIndex(num_examples=len(source)))


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
    return shard_index, shard_count


def _check_sizes(*, image_size: int, batch_size: int) -> None:
    if image_size < 2 or image_size % 2:
        raise ValueError(f"image_size={image_size} must be even (the policy image is half).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")


def train_dataset(
    dataset: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    image_size: int,
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    crop_scale: tuple[float, float] = (0.35, 1.0),
    cache_in_memory_mb: float = 0,
) -> grain.MapDataset:
    """The infinite training MapDataset of this process's batches (see `make_train_iterator`)."""
    _check_sizes(image_size=image_size, batch_size=batch_size)
    shard_index, shard_count = _shard(shard_index, shard_count)
    ds = _source_dataset(dataset, split, data_dir, cache_in_memory_mb)
    # One global stream, the same on every process: the split reshuffled every epoch, each
    # photo's crop and flip drawn from its position in the stream. Cut into per-process pieces
    # of B, global batch t is pieces t·P … t·P + P − 1, and process p reads piece t·P + p (the
    # MapDataset is lazy: it decodes only its own pieces). Batch t is therefore the same photos,
    # crops and row order on 1 process or 64: the data order does not depend on the topology.
    ds = ds.seed(seed).shuffle().repeat()
    ds = ds.map(DecodeImage())
    ds = ds.random_map(RandomResizedCrop(size=image_size, scale=crop_scale))
    ds = ds.random_map(RandomFlip())
    ds = ds.map(AddPolicyImage())
    ds = ds.map(ToModelInputs())
    return ds.batch(batch_size, drop_remainder=True)[shard_index::shard_count]


def eval_dataset(
    dataset: str,
    *,
    data_dir: str | None = None,
    split: str = "test",
    image_size: int,
    batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    crop_fraction: float = 1.0,
    cache_in_memory_mb: float = 0,
) -> grain.MapDataset:
    """One pass over this process's shard, padded to whole batches (see `make_eval_iterator`)."""
    _check_sizes(image_size=image_size, batch_size=batch_size)
    shard_index, shard_count = _shard(shard_index, shard_count)
    full = _source_dataset(dataset, split, data_dir, cache_in_memory_mb)
    # Every process runs the same number of batches (a multi-host jitted step needs all
    # processes), so shards are padded to the batch count of the largest shard.
    num_batches = math.ceil(math.ceil(len(full) / shard_count) / batch_size)
    ds = full[shard_index::shard_count]
    padding = num_batches * batch_size - len(ds)
    if padding:
        filler = full[:1].repeat(padding).map(MarkPadding())
        ds = grain.MapDataset.concatenate([ds, filler])
    ds = ds.map(DecodeImage())
    ds = ds.map(ResizeCentreCrop(size=image_size, crop_fraction=crop_fraction))
    ds = ds.map(AddPolicyImage())
    ds = ds.map(ToModelInputs())
    return ds.batch(batch_size)


def _iterate(
    ds: grain.MapDataset, *, worker_count: int, prefetch_buffer_size: int
) -> grain.DatasetIterator:
    # Elements are whole batches here, so the buffer is counted in batches.
    threads = min(prefetch_buffer_size, os.cpu_count() or 1)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch_buffer_size)
    it_ds = ds.to_iter_dataset(read_options)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # grain's worker processes read its absl flags; outside `app.run` (notebooks,
            # pytest) nothing parsed them, so take their defaults.
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=max(1, prefetch_buffer_size)
            )
        )
    return iter(it_ds)


def make_train_iterator(
    dataset: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    image_size: int,
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    prefetch_buffer_size: int = 2,
    crop_scale: tuple[float, float] = (0.35, 1.0),
    cache_in_memory_mb: float = 0,
) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches.

    Args:
      dataset: TFDS name, e.g. ``geo_twins`` or ``landmark420`` (must be built).
      data_dir: TFDS data directory; None means TFDS's default.
      split: TFDS split (slicing like ``train[:90%]`` works).
      image_size: S, the recognizer's resolution (even; the policy image is S/2).
      batch_size: B, this process's share of the global batch.
      seed: seeds the shuffle (reshuffled every epoch) and the augmentation.
      shard_index, shard_count: this process's shard; default `jax.process_index()` and
        `jax.process_count()`.
      worker_count: grain worker processes (0: threads in this process only).
      prefetch_buffer_size: batches prepared ahead (per worker when `worker_count` > 0).
      crop_scale: area fraction range of the random resized crop.
      cache_in_memory_mb: serve the split from memory, decoded once per process, when its
        decoded photos take at most this many MB (0: always read and decode from disk). The
        batches are the same either way.

    Returns:
      A `grain.DatasetIterator` of dicts as in the module docstring (``mask`` all True). Its
      `get_state()`/`set_state()` (and Orbax's `grain.checkpoint.CheckpointSave/Restore`)
      resume exactly: a restored iterator yields the batches the original would have.
    """
    ds = train_dataset(
        dataset,
        data_dir=data_dir,
        split=split,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        crop_scale=crop_scale,
        cache_in_memory_mb=cache_in_memory_mb,
    )
    return _iterate(ds, worker_count=worker_count, prefetch_buffer_size=prefetch_buffer_size)


def make_eval_iterator(
    dataset: str,
    *,
    data_dir: str | None = None,
    split: str = "test",
    image_size: int,
    batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    prefetch_buffer_size: int = 2,
    crop_fraction: float = 1.0,
    cache_in_memory_mb: float = 0,
) -> grain.DatasetIterator:
    """One pass over this process's shard of `split`, resized and centre-cropped.

    Every example of the split appears in exactly one process's batches with ``mask`` True;
    the last batches are padded (``mask`` False) so that all processes yield the same number
    of full batches of `batch_size`. Arguments as in `make_train_iterator`; `crop_fraction`
    is the centred square's side as a fraction of the shorter side (1.0: the whole square).
    Splits that fit in `cache_in_memory_mb` are decoded once and served from memory.
    """
    ds = eval_dataset(
        dataset,
        data_dir=data_dir,
        split=split,
        image_size=image_size,
        batch_size=batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        crop_fraction=crop_fraction,
        cache_in_memory_mb=cache_in_memory_mb,
    )
    return _iterate(ds, worker_count=worker_count, prefetch_buffer_size=prefetch_buffer_size)

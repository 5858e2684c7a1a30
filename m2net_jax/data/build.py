r"""Builds one of the project's TFDS datasets as array_record, with progress and a closing report.

  python -m m2net_jax.data.build --dataset=geo_twins                 # embedded, seconds
  python -m m2net_jax.data.build --dataset=geo_twins/64px
  python -m m2net_jax.data.build --dataset=landmark420 --manual_dir=/data/gldv2 \
      [--data_dir=~/tensorflow_datasets]

`landmark420` / `landmark732` read GLDv2 from --manual_dir (what goes there:
`landmarks.MANUAL_DOWNLOAD_INSTRUCTIONS`, printed when something is missing). At the end the
kept and skipped counts by reason are printed (`build_report.json` in the dataset directory).

Plain TFDS builds them too, once the module is imported:
  tfds build landmark420 --imports=m2net_jax.data --manual_dir=/data/gldv2 --data_dir=...
"""

import contextlib
import io
import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging

import m2net_jax.data  # noqa: F401  (registers every builder of the package with TFDS)
from m2net_jax.data import landmarks

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program: importing `build_dataset` must not claim flag names
    # (`--dataset`, `--data_dir`) that other entry points define too.
    flags.DEFINE_string(
        "dataset", None, "TFDS name[/config]: landmark420, landmark732, geo_twins[/config]."
    )
    flags.DEFINE_string(
        "manual_dir", None, "GLDv2 directory for landmark420/landmark732 (train.csv, images...)."
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data directory to write to; TFDS's default (~/tensorflow_datasets)."
    )
    flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset already exists.")
    flags.mark_flag_as_required("dataset")


def build_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
    """Builds TFDS dataset `name` ('landmark420', 'geo_twins/64px', ...) as array_record.

    Args:
      name: registered TFDS name, optionally with '/config'.
      data_dir: TFDS data directory; None for TFDS's default.
      manual_dir: directory with the manually downloaded data (GLDv2 for the landmark sets).
      overwrite: rebuild when the dataset already exists (otherwise it is reused).

    Returns:
      The builder of the built dataset (`builder.as_data_source(split)` reads it).
    """
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if name.split("/")[0] == "geo_twins":
        tfds.disable_progress_bar()  # Seconds long: its bars say less than the closing line.
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout although
    # nothing is downloaded; stdout keeps only this tool's closing summary (progress bars, for
    # the long GLDv2 builds, stay on stderr).
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, download_mode=mode, try_download_gcs=False
            )
        )
    return builder


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        builder = build_dataset(
            FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            manual_dir=FLAGS.manual_dir,
            overwrite=FLAGS.overwrite,
        )
    except (landmarks.ManualDirError, landmarks.TooFewLandmarksError) as error:
        sys.exit(f"Cannot build {FLAGS.dataset}: {error}")
    logging.info("Built %s in %s", builder.info.full_name, builder.data_dir)
    splits = ", ".join(
        f"{name}: {split.num_examples}" for name, split in builder.info.splits.items()
    )
    print(f"{builder.info.full_name} in {builder.data_dir} ({splits})")
    if isinstance(builder, landmarks.LandmarkBuilder):
        print(landmarks.format_build_report(builder.build_report()))


def cli():
    """The `m2net-build` console script."""
    _define_flags()
    # absl's --help lists the flags of the running script, sys.argv[0]: here the console
    # script's shim, not this module.
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


if __name__ == "__main__":
    cli()

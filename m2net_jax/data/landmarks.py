"""TFDS builders for Landmark-420 and Landmark-732: GLDv2 landmarks with GPS coordinates (§4.1.1).

The paper builds its two datasets from the Google Landmarks Dataset v2 (GLDv2) by keeping
landmarks whose location is known. GLDv2 cannot be downloaded by code, so `landmark420` and
`landmark732` read a manual directory laid out as GLDv2 ships it (see
`MANUAL_DOWNLOAD_INSTRUCTIONS`) plus a `landmark_coordinates.csv` the user makes.

A build runs in two phases:

1. *Scan* (once per build, in `_split_generators`): read the two CSVs by their headers, find the
   image files (the extracted `train/` tree or the `images_NNN.tar` archives, read in place;
   `gldv2`), rank the landmarks with valid coordinates by their number of *decodable* images,
   keep the top K and split each class into train/test (`landmark_selection`). Only the
   landmarks that compete for the top K are decoded, so a full GLDv2 build decodes little more
   than the kept images. No image is held in memory between the phases.
2. *Generation*: decode each kept image again, cap its shorter side at `max_side`, re-encode it
   as JPEG and write `array_record` shards.

Labels are 0 … K-1 in rank order (label 0: the landmark with the most images); the `label`
feature's names are the GLDv2 landmark ids. The paper says Landmark-420 has 420 classes in Table 3
and "150,000 … images from 732 classes" in §4.1.1; we take 420 (the name and the classifier size).

Every bad input is skipped, counted under its reason and listed in a build report
(`landmark_report`): logged at the end of the build and written as `build_report.json` next to
the dataset (`Landmark420.build_report()`, `format_build_report`). A failed build (manual
directory missing or incomplete, too few eligible landmarks) leaves no folders behind.

The names of `gldv2`, `landmark_selection` and `landmark_report` that users and tests call are
importable from here too.
"""

import collections
import dataclasses
import json
from collections.abc import Sequence
from concurrent import futures

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from m2net_jax import geo
from m2net_jax.data import gldv2
from m2net_jax.data.gldv2 import (
    COORDINATES_CSV,
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    TAR_PATTERN,
    TRAIN_CSV,
    TRAIN_DIR,
    ImageFile,
    ManualDirError,
    load_image,
)
from m2net_jax.data.landmark_report import (
    BUILD_REPORT_FILENAME,
    SKIP_REASONS,
    BuildReport,
    format_build_report,
    read_build_report,
)
from m2net_jax.data.landmark_selection import (
    MIN_IMAGES_PER_CLASS,
    select_classes,
    split_class_images,
)

__all__ = [
    "BUILD_REPORT_FILENAME",
    "COORDINATES_CSV",
    "MANUAL_DOWNLOAD_INSTRUCTIONS",
    "MIN_IMAGES_PER_CLASS",
    "SKIP_REASONS",
    "TAR_PATTERN",
    "TRAIN_CSV",
    "TRAIN_DIR",
    "BuildReport",
    "Landmark420",
    "Landmark732",
    "LandmarkBuilder",
    "LandmarkConfig",
    "ManualDirError",
    "TooFewLandmarksError",
    "format_build_report",
    "load_image",
    "read_build_report",
    "split_class_images",
]

# Images decoded ahead of the writer during generation; bounds memory, not the result.
_GENERATION_CHUNK = 256

_DESCRIPTION = """\
{name}: the {num_classes} landmarks of the Google Landmarks Dataset v2 (GLDv2) training set that
have GPS coordinates and the most images, as in the M²Net paper (§4.1.1), where geo-located
landmark photos let a policy network use the location to choose which residual blocks to run.
Each example is a GLDv2 photo (JPEG, shorter side at most {max_side} px), its class (label 0 is the
landmark with the most images; the label names are GLDv2 landmark ids), the landmark's latitude
and longitude in decimal degrees, and `location`, the paper's degrees-minutes-seconds 8-vector.
Landmarks are ranked by their number of decodable images (ties by landmark id); each class is
split into train and test by a fixed hash order of its image ids. Built from a manual GLDv2
download plus a landmark_coordinates.csv the user makes; skipped inputs are reported in
build_report.json next to the dataset.
"""

_CITATION = r"""@article{qian2019m2net,
  author = {Qian, Biao and Wang, Yang and Zhang, Zhao and Hong, Richang and Wang, Meng and
            Shao, Ling},
  title = {Diversifying Inference Path Selection: Moving-Mobile-Network for Landmark
           Recognition},
  journal = {arXiv preprint arXiv:1912.00418},
  year = {2019},
}

@inproceedings{weyand2020gldv2,
  author = {Weyand, Tobias and Araujo, Andr{\'e} and Cao, Bingyi and Sim, Jack},
  title = {Google Landmarks Dataset v2 -- A Large-Scale Benchmark for Instance-Level
           Recognition and Retrieval},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern
               Recognition (CVPR)},
  year = {2020},
}
"""


class TooFewLandmarksError(ValueError):
    """Fewer eligible landmarks than the configured class count."""


@dataclasses.dataclass(eq=False, kw_only=True)
class LandmarkConfig(tfds.core.BuilderConfig):
    """How many classes, how much test data, how large the stored images are.

    Attributes:
      num_classes: K, landmarks kept (the top K by number of decodable images).
      test_fraction: share of each class's images in the test split (at least one image).
      max_side: the shorter side of a stored image is at most this many pixels (never upscaled).
      jpeg_quality: quality of the re-encoded JPEGs.
    """

    num_classes: int = 420
    test_fraction: float = 15 / 165
    max_side: int = 256
    jpeg_quality: int = 90


@dataclasses.dataclass(frozen=True, slots=True)
class _Example:
    image_id: str
    image_file: ImageFile
    label: int
    landmark_id: int
    latitude: float
    longitude: float


@dataclasses.dataclass
class _Plan:
    class_ids: list[int]  # K landmark ids in label order (rank order)
    train: list[_Example]
    test: list[_Example]


def _plan(
    manual_dir: epath.Path, config: LandmarkConfig, report: BuildReport, *, dataset: str
) -> _Plan:
    """The scan: reads the CSVs, finds and checks images, picks the classes, splits them."""
    gldv2.check_manual_dir(manual_dir)
    coordinates = gldv2.read_coordinates(manual_dir / COORDINATES_CSV, report)
    landmark_of, conflicting = gldv2.read_train_csv(manual_dir / TRAIN_CSV, report)
    report.summary["listed_images"] = len(landmark_of)

    listed_per_landmark = collections.Counter(landmark_of.values())
    report.summary["listed_landmarks"] = len(listed_per_landmark)
    for landmark_id in sorted(listed_per_landmark):
        if landmark_id not in coordinates:
            report.skip("landmark_without_coordinates", str(landmark_id))
            report.summary["images_of_landmarks_without_coordinates"] += listed_per_landmark[
                landmark_id
            ]

    images = gldv2.find_images(
        manual_dir,
        landmark_of=landmark_of,
        conflicting=conflicting,
        wanted=coordinates.__contains__,
        report=report,
    )
    candidates: dict[int, list[str]] = collections.defaultdict(list)
    for image_id in sorted(landmark_of):
        landmark_id = landmark_of[image_id]
        if landmark_id not in coordinates:
            continue
        if image_id in images:
            candidates[landmark_id].append(image_id)
        else:
            report.skip("image_missing", image_id)

    selected = select_classes(
        candidates,
        images,
        num_classes=config.num_classes,
        max_side=config.max_side,
        report=report,
    )
    if len(selected) < config.num_classes:
        logging.error(
            "%s", format_build_report(report.to_json(dataset=dataset, config=config.name))
        )
        skipped = ", ".join(
            f"{reason}={entry['count']}" for reason, entry in report.skipped.items()
        )
        raise TooFewLandmarksError(
            f"Found only {len(selected)} eligible landmarks in {manual_dir} (valid coordinates "
            f"and at least {MIN_IMAGES_PER_CLASS} decodable images); config {config.name!r} "
            f"needs {config.num_classes}. Of the {len(listed_per_landmark)} landmarks in "
            f"{TRAIN_CSV}, {len(candidates)} have valid coordinates and image files. Skipped "
            f"inputs: {skipped or 'none'}. Add coordinates for more landmarks to "
            f"{COORDINATES_CSV}."
        )

    plan = _Plan(class_ids=[landmark_id for landmark_id, _ in selected], train=[], test=[])
    for label, (landmark_id, image_ids) in enumerate(selected):
        train_ids, test_ids = split_class_images(image_ids, test_fraction=config.test_fraction)
        latitude, longitude = coordinates[landmark_id]
        for split_ids, examples in ((train_ids, plan.train), (test_ids, plan.test)):
            examples.extend(
                _Example(i, images[i], label, landmark_id, latitude, longitude) for i in split_ids
            )
    return plan


def _remove_empty(paths: Sequence[epath.Path]) -> None:
    """Deletes each of `paths` (in order) that is a file or an empty folder."""
    for path in paths:
        if path.is_file():
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


class LandmarkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder of Landmark-420 and Landmark-732; the subclasses set the class count.

    Writes `array_record` by default (grain reads it with random access). Pass
    `config=LandmarkConfig(name=..., num_classes=...)` for a custom class count.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own `code_path` imports `importlib_resources` (a backport it needs only
        # on Python < 3.9 and does not install) for any builder that lives in a package. This is
        # the answer it would compute; remove once TFDS fixes it.
        return epath.Path(__file__)

    def __init__(self, *, file_format=None, **kwargs):
        # array_record by default: the grain pipeline reads it with random access.
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._report: BuildReport | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        config: LandmarkConfig = self.builder_config
        description = _DESCRIPTION.format(
            name=self.name, num_classes=config.num_classes, max_side=config.max_side
        )
        return self.dataset_info_from_configs(
            description=description,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    # Names (landmark ids as strings, label 0 = most images) are set by the scan.
                    "label": tfds.features.ClassLabel(num_classes=config.num_classes),
                    "landmark_id": tfds.features.Scalar(dtype=np.int64),
                    # float32: tf.train.Example has no float64 (TFDS would cast silently);
                    # 1e-6 degrees is about 10 cm. `location` is computed from the float64s.
                    "latitude": tfds.features.Scalar(dtype=np.float32),
                    "longitude": tfds.features.Scalar(dtype=np.float32),
                    "location": tfds.features.Tensor(shape=(8,), dtype=np.float32),
                    "image_id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/cvdfoundation/google-landmark",
            citation=_CITATION,
        )

    def download_and_prepare(self, **kwargs) -> None:
        """TFDS's build; a failed build also removes the folders it created and left empty.

        Before generating, TFDS makes ``<data_dir>/<name>/<config>/``,
        ``<name>/.config/metadata.json`` and ``<data_dir>/downloads/extracted/``; on failure it
        deletes only its temporary version folder, and the rest would look like a dataset that
        is not there. What existed before the build is never touched.
        """
        data_dir = epath.Path(self.data_dir_root)
        dataset_dir = epath.Path(self.data_path).parent.parent
        downloads = epath.Path(kwargs.get("download_dir") or data_dir / "downloads")
        # Deepest first, so that a folder is empty by the time its turn comes.
        candidates = [
            epath.Path(self.data_path),
            epath.Path(self.data_path).parent,
            dataset_dir / ".config" / "metadata.json",
            dataset_dir / ".config",
            dataset_dir,
            downloads / "extracted",
            downloads,
            data_dir,
        ]
        created = [path for path in candidates if not path.exists()]
        try:
            super().download_and_prepare(**kwargs)
        except BaseException:
            _remove_empty(created)
            raise

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as error:  # TFDS's way of saying "missing or empty".
            raise ManualDirError(str(error)) from error
        self._report = BuildReport()
        plan = _plan(manual_dir, self.builder_config, self._report, dataset=self.name)
        self._report.kept["classes"] = len(plan.class_ids)
        self.info.features["label"].names = [str(landmark_id) for landmark_id in plan.class_ids]
        return {
            "train": self._generate_examples(plan.train, split="train"),
            "test": self._generate_examples(plan.test, split="test"),
        }

    def _generate_examples(self, examples: Sequence[_Example], *, split: str):
        config: LandmarkConfig = self.builder_config
        encode = lambda e: gldv2.reencode_jpeg(
            e.image_file, max_side=config.max_side, quality=config.jpeg_quality
        )
        with futures.ThreadPoolExecutor(gldv2.DECODE_THREADS) as executor:
            for start in range(0, len(examples), _GENERATION_CHUNK):
                chunk = examples[start : start + _GENERATION_CHUNK]
                for example, jpeg in zip(chunk, executor.map(encode, chunk), strict=True):
                    if jpeg is None:
                        # Decoded during the scan, so the file changed since; the class keeps
                        # its place and the image is reported.
                        self._report.skip("image_corrupt", example.image_id)
                        continue
                    self._report.kept[split] += 1
                    yield (
                        example.image_id,
                        {
                            "image": jpeg,
                            "label": example.label,
                            "landmark_id": example.landmark_id,
                            "latitude": example.latitude,
                            "longitude": example.longitude,
                            "location": geo.encode_location(example.latitude, example.longitude),
                            "image_id": example.image_id,
                        },
                    )

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        if self._report is None:  # Nothing was generated (max_examples_per_split=0).
            return
        report = self._report.to_json(
            dataset=self.name,
            config=self.builder_config.name,
            num_classes=self.builder_config.num_classes,
        )
        # self.data_dir is TFDS's temporary directory here, renamed to the final one on success.
        path = epath.Path(self.data_dir) / BUILD_REPORT_FILENAME
        path.write_text(json.dumps(report, indent=2) + "\n")
        logging.info("%s", format_build_report(report))

    def build_report(self) -> dict:
        """The report of the build that wrote this dataset (see `format_build_report`)."""
        return read_build_report(self.data_dir)


class Landmark420(LandmarkBuilder):
    """Landmark-420: the 420 GLDv2 landmarks with coordinates and the most images (§4.1.1)."""

    BUILDER_CONFIGS = [
        LandmarkConfig(
            name="default",
            description="420 classes; test share 15/165 per class (paper: 150k train, 15k test).",
            num_classes=420,
            test_fraction=15 / 165,
        )
    ]


class Landmark732(LandmarkBuilder):
    """Landmark-732: the 732 GLDv2 landmarks with coordinates and the most images (§4.1.1)."""

    BUILDER_CONFIGS = [
        LandmarkConfig(
            name="default",
            description="732 classes; test share 40/420 per class (paper: 380k train, 40k test).",
            num_classes=732,
            test_fraction=40 / 420,
        )
    ]

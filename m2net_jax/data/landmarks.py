"""TFDS builders for Landmark-420 and Landmark-732: GLDv2 landmarks with GPS coordinates (§4.1.1).

The paper builds its two datasets from the Google Landmarks Dataset v2 (GLDv2) by keeping
landmarks whose location is known. GLDv2 cannot be downloaded by code, so `landmark420` and
`landmark732` read a manual directory laid out as GLDv2 ships it (see
`MANUAL_DOWNLOAD_INSTRUCTIONS`) plus a `landmark_coordinates.csv` the user makes.

A build runs in two phases:

1. *Scan* (once per build, in `_split_generators`): read the two CSVs by their headers, find the
   image files (the extracted `train/` tree or the `images_NNN.tar` archives, read in place),
   rank the landmarks with valid coordinates by their number of *decodable* images, keep the top
   K, and split each class into train/test. Images are decoded during the scan only for the
   landmarks that compete for the top K: candidates are taken from a heap ordered by an upper
   bound (files present), and a landmark's images are decoded when it reaches the top; its exact
   count goes back into the heap. The selection is therefore exactly "top K by valid image count,
   ties by landmark id", while a full GLDv2 build decodes little more than the kept images. No
   image is held in memory between the phases.
2. *Generation*: decode each kept image again, cap its shorter side at `max_side`, re-encode it
   as JPEG and write `array_record` shards.

Labels are 0 … K-1 in rank order (label 0: the landmark with the most images); the `label`
feature's names are the GLDv2 landmark ids. The paper says Landmark-420 has 420 classes in Table 3
and "150,000 … images from 732 classes" in §4.1.1; we take 420 (the name and the classifier size).

Every bad input (malformed CSV row, conflicting duplicate, landmark without coordinates, missing,
unlisted or corrupt image, unreadable archive) is skipped, counted under its reason (`SKIP_REASONS`)
and listed with its first few ids in a build report: logged at the end of the build and written as
`build_report.json` next to the dataset (`Landmark420.build_report()`, `format_build_report`).
"""

import collections
import csv
import dataclasses
import hashlib
import heapq
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from m2net_jax import geo

BUILD_REPORT_FILENAME = "build_report.json"
TRAIN_CSV = "train.csv"
COORDINATES_CSV = "landmark_coordinates.csv"
TRAIN_DIR = "train"
TAR_PATTERN = "images_*.tar"

# A class needs one image in each split.
MIN_IMAGES_PER_CLASS = 2

# Decoding and resizing run in C with the GIL released, so threads give real parallelism.
_DECODE_THREADS = min(8, os.cpu_count() or 1)
# Images decoded ahead of the writer during generation; bounds memory, not the result.
_GENERATION_CHUNK = 256
_IMAGE_SUFFIXES = (".jpg", ".jpeg")
# PIL's ways of saying "this is not a decodable image" (truncated data, unknown format, bad
# header fields, absurd dimensions).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)

# reason -> (what is counted, what it means). The report lists only reasons that occurred.
SKIP_REASONS: dict[str, tuple[str, str]] = {
    "train_csv_malformed_row": (
        "row",
        "train.csv row with the wrong number of fields, an empty id or a non-integer landmark_id",
    ),
    "train_csv_duplicate_id": (
        "row",
        "train.csv row repeating an image id with the same landmark_id (extra row ignored)",
    ),
    "train_csv_conflicting_id": (
        "image",
        "image id listed in train.csv under different landmark_ids (image dropped)",
    ),
    "coordinates_malformed_row": (
        "row",
        "landmark_coordinates.csv row with the wrong number of fields, a non-integer "
        "landmark_id or an unparsable latitude/longitude",
    ),
    "coordinates_out_of_range": (
        "row",
        "latitude outside [-90, 90] or longitude outside [-180, 180], NaN or infinite",
    ),
    "coordinates_duplicate_row": (
        "row",
        "landmark_coordinates.csv row repeating a landmark with the same coordinates (ignored)",
    ),
    "coordinates_conflicting": (
        "landmark",
        "landmark given different coordinates in several rows (coordinates dropped)",
    ),
    "landmark_without_coordinates": (
        "landmark",
        "landmark in train.csv without valid coordinates (absent, or dropped for one of the "
        "reasons above); all its images are left out",
    ),
    "image_missing": (
        "image",
        "image of a landmark with coordinates listed in train.csv but not found on disk",
    ),
    "image_not_listed": ("image", "image file found on disk but absent from train.csv"),
    "image_duplicate_file": (
        "image",
        "second file for an image id already found (the first in sorted path order is used)",
    ),
    "image_corrupt": ("image", "image file that cannot be read or decoded (corrupt, truncated)"),
    "source_unreadable": (
        "source",
        "directory under train/ or images_*.tar archive that cannot be read (to its end)",
    ),
}

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Landmark-420 and Landmark-732 are subsets of the Google Landmarks Dataset v2 (GLDv2,
https://github.com/cvdfoundation/google-landmark), which cannot be downloaded by code. Put these
in the manual directory (`--manual_dir` of `python -m m2net_jax.data.build`; TFDS's default is
<data_dir>/downloads/manual):

  {TRAIN_CSV}
      GLDv2's training list, https://s3.amazonaws.com/google-landmark/metadata/train.csv,
      columns id,url,landmark_id (a header row is required; any column order).
  {TRAIN_DIR}/<a>/<b>/<c>/<id>.jpg
      the training images extracted, a, b, c the first three characters of the id;
    OR images_000.tar ... images_499.tar
      GLDv2's training archives as downloaded (https://s3.amazonaws.com/google-landmark/train/),
      not extracted: images are read straight from them. If {TRAIN_DIR}/ exists, archives are
      ignored.
  {COORDINATES_CSV}
      columns landmark_id,latitude,longitude (header required, any order): decimal degrees,
      north and east positive, one row per landmark. You make this file, e.g. from the
      coordinates on the Wikimedia Commons category page of each landmark (GLDv2's
      train_label_to_category.csv, https://s3.amazonaws.com/google-landmark/metadata/
      train_label_to_category.csv, links each landmark_id to its category page).

The build keeps landmarks with valid coordinates, ranks them by number of decodable images
(ties by landmark id) and takes the top 420 or 732. Skipped inputs are reported in
build_report.json next to the built dataset.
"""


_GLDV2_CITATION = """\
@inproceedings{weyand2020gldv2,
  author = {Weyand, Tobias and Araujo, Andr{\'e} and Cao, Bingyi and Sim, Jack},
  title = {Google Landmarks Dataset v2 -- A Large-Scale Benchmark for Instance-Level
           Recognition and Retrieval},
  booktitle = {CVPR},
  year = {2020},
}
"""


class ManualDirError(FileNotFoundError):
    """The manual directory is missing, empty or lacks one of the GLDv2 files."""


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


class BuildReport:
    """Counts of skipped inputs by reason (first few ids each) and of what was kept."""

    def __init__(self, *, max_examples: int = 10):
        self.max_examples = max_examples
        self.skipped: dict[str, dict] = {}
        self.summary: dict[str, int] = collections.Counter()
        self.kept: dict[str, int] = collections.Counter()

    def skip(self, reason: str, item: str) -> None:
        """Counts one skipped `item` (an id, a line reference) under `reason`."""
        if reason not in SKIP_REASONS:
            raise KeyError(f"Unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}.")
        entry = self.skipped.setdefault(
            reason, {"unit": SKIP_REASONS[reason][0], "count": 0, "examples": []}
        )
        entry["count"] += 1
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append(item)

    def to_json(self, **header) -> dict:
        ordered = {
            reason: self.skipped[reason] for reason in SKIP_REASONS if reason in self.skipped
        }
        return {
            **header,
            "kept": dict(self.kept),
            "summary": dict(self.summary),
            "skipped": ordered,
        }


def format_build_report(report: dict) -> str:
    """Human-readable closing report: kept counts, then skipped counts and examples by reason."""
    kept = report.get("kept", {})
    lines = [
        f"Build report for {report.get('dataset', '?')}/{report.get('config', '?')}: "
        f"kept {kept.get('classes', 0)} classes, {kept.get('train', 0)} train and "
        f"{kept.get('test', 0)} test images."
    ]
    lines += [f"  {key}: {value}" for key, value in report.get("summary", {}).items()]
    skipped = report.get("skipped", {})
    if not skipped:
        lines.append("  Nothing skipped.")
    for reason, entry in skipped.items():
        description = SKIP_REASONS.get(reason, ("", ""))[1]
        examples = ", ".join(entry["examples"])
        more = ", ..." if entry["count"] > len(entry["examples"]) else ""
        lines.append(
            f"  skipped {entry['count']} {entry['unit']}(s): {reason} ({description})\n"
            f"      e.g. {examples}{more}"
        )
    return "\n".join(lines)


def read_build_report(data_dir: epath.PathLike) -> dict:
    """Reads `build_report.json` from a built dataset's directory (…/name/config/version)."""
    path = epath.Path(data_dir) / BUILD_REPORT_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"No {BUILD_REPORT_FILENAME} in {data_dir}; is it a built dataset?")
    return json.loads(path.read_text())


def split_class_images(
    image_ids: Iterable[str], *, test_fraction: float
) -> tuple[list[str], list[str]]:
    """Splits one class's image ids into (train, test), deterministically.

    The ids are ordered by their SHA-256 (a fixed pseudo-random order that does not depend on
    file or CSV order) and the first `max(1, round(n * test_fraction))` go to test, at most n - 1.

    Args:
      image_ids: n ≥ 2 distinct image ids of one class.
      test_fraction: share of the class that goes to test.

    Returns:
      (train ids, test ids), each sorted.
    """
    order = sorted(image_ids, key=lambda i: (hashlib.sha256(i.encode()).digest(), i))
    if len(order) < MIN_IMAGES_PER_CLASS:
        raise ValueError(f"A class needs at least {MIN_IMAGES_PER_CLASS} images, got {order}.")
    num_test = min(len(order) - 1, max(1, math.floor(len(order) * test_fraction + 0.5)))
    return sorted(order[num_test:]), sorted(order[:num_test])


@dataclasses.dataclass(frozen=True, slots=True)
class _ImageFile:
    """Where an image's bytes are: a whole file, or `size` bytes at `offset` inside a tar."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclasses.dataclass(frozen=True, slots=True)
class _Example:
    image_id: str
    image_file: _ImageFile
    label: int
    landmark_id: int
    latitude: float
    longitude: float


@dataclasses.dataclass
class _Plan:
    class_ids: list[int]  # K landmark ids in label order (rank order)
    train: list[_Example]
    test: list[_Example]


def load_image(data: bytes, *, max_side: int) -> PIL.Image.Image:
    """Decodes image bytes to RGB with the shorter side capped at `max_side` (never upscaled).

    Raises one of OSError, SyntaxError, ValueError, EOFError or DecompressionBombError for data
    that is not a complete decodable image.
    """
    with PIL.Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if min(width, height) < 1:
            raise ValueError(f"Image of size {image.size}.")
        scale = max_side / min(width, height)
        if scale < 1:
            # JPEG DCT scaling: decode at the smallest power-of-two reduction that still covers
            # the target size, several times faster than a full decode for GLDv2's large photos.
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        rgb = image.convert("RGB")  # Forces the full decode, so truncated data raises here.
    width, height = rgb.size
    scale = max_side / min(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, PIL.Image.Resampling.BICUBIC)
    return rgb


def _reencode(image_file: _ImageFile, *, max_side: int, quality: int) -> bytes | None:
    """The stored JPEG for one image, or None when it cannot be read or decoded."""
    try:
        image = load_image(image_file.read(), max_side=max_side)
    except _DECODE_ERRORS:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _is_decodable(image_file: _ImageFile, *, max_side: int) -> bool:
    try:
        load_image(image_file.read(), max_side=max_side)
    except _DECODE_ERRORS:
        return False
    return True


def _read_csv(
    path: epath.Path, required: Sequence[str], *, malformed_reason: str, report: BuildReport
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (line number, {column: stripped value}) for each well-formed data row.

    Columns are found by the header (case-insensitive, any order, extra columns allowed). A row
    whose field count differs from the header's, or that the csv module cannot parse, is
    counted under `malformed_reason`. Blank lines carry no data and are passed over.
    """
    # utf-8-sig: a coordinates file saved by a spreadsheet often starts with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; it needs a header row naming {list(required)}.")
        columns = [name.strip().lower() for name in header]
        missing = [name for name in required if name not in columns]
        if missing:
            raise ValueError(
                f"{path}: the header {header} lacks the column(s) {missing}; the first row must "
                f"name the columns {list(required)} (any order).\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        index = {name: columns.index(name) for name in required}
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                report.skip(malformed_reason, f"{path.name} line {reader.line_num} ({error})")
                continue
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(columns):
                report.skip(malformed_reason, f"{path.name} line {reader.line_num}")
                continue
            yield reader.line_num, {name: row[i].strip() for name, i in index.items()}


def _read_train_csv(path: epath.Path, report: BuildReport) -> tuple[dict[str, int], set[str]]:
    """Returns ({image id: landmark id} for usable rows, ids dropped for conflicting labels)."""
    landmark_of: dict[str, int] = {}
    conflicting: set[str] = set()
    for line, row in _read_csv(
        path, ("id", "landmark_id"), malformed_reason="train_csv_malformed_row", report=report
    ):
        report.summary["train_csv_rows"] += 1
        image_id = row["id"]
        try:
            landmark_id = int(row["landmark_id"])
        except ValueError:
            landmark_id = None
        if not image_id or landmark_id is None:
            report.skip("train_csv_malformed_row", f"{path.name} line {line}")
            continue
        if image_id in conflicting:
            continue  # Already dropped with all its rows.
        previous = landmark_of.get(image_id)
        if previous is None:
            landmark_of[image_id] = landmark_id
        elif previous == landmark_id:
            report.skip("train_csv_duplicate_id", f"{image_id} ({path.name} line {line})")
        else:
            # Which label is right cannot be told; keeping either would depend on row order.
            del landmark_of[image_id]
            conflicting.add(image_id)
            report.skip("train_csv_conflicting_id", image_id)
    return landmark_of, conflicting


def _read_coordinates(path: epath.Path, report: BuildReport) -> dict[int, tuple[float, float]]:
    """Returns {landmark id: (latitude, longitude)} for landmarks with one valid location."""
    coordinates: dict[int, tuple[float, float]] = {}
    conflicting: set[int] = set()
    for line, row in _read_csv(
        path,
        ("landmark_id", "latitude", "longitude"),
        malformed_reason="coordinates_malformed_row",
        report=report,
    ):
        try:
            landmark_id = int(row["landmark_id"])
            latitude, longitude = float(row["latitude"]), float(row["longitude"])
        except ValueError:
            report.skip("coordinates_malformed_row", f"{path.name} line {line}")
            continue
        try:
            geo.encode_location(latitude, longitude)
        except ValueError:
            report.skip(
                "coordinates_out_of_range",
                f"{landmark_id} ({row['latitude']}, {row['longitude']}; {path.name} line {line})",
            )
            continue
        if landmark_id in conflicting:
            continue
        previous = coordinates.get(landmark_id)
        if previous is None:
            coordinates[landmark_id] = (latitude, longitude)
        elif previous == (latitude, longitude):
            report.skip("coordinates_duplicate_row", f"{landmark_id} ({path.name} line {line})")
        else:
            del coordinates[landmark_id]
            conflicting.add(landmark_id)
            report.skip("coordinates_conflicting", str(landmark_id))
    return coordinates


def _walk_tree(tree: str, report: BuildReport) -> Iterator[tuple[str, _ImageFile]]:
    """Yields (image id, file) for the JPEGs under `tree`, in sorted path order."""

    def on_error(error: OSError) -> None:
        report.skip("source_unreadable", f"{error.filename}: {error.strerror}")

    for root, dirs, names in os.walk(tree, onerror=on_error):
        dirs.sort()
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in _IMAGE_SUFFIXES:
                yield stem, _ImageFile(os.path.join(root, name))


def _walk_tars(tars: Sequence[epath.Path], report: BuildReport) -> Iterator[tuple[str, _ImageFile]]:
    """Yields (image id, member location) for the JPEG members of uncompressed tar archives."""
    for tar_path in tars:
        try:
            # Iterating reads one header at a time and seeks over the data: no extraction.
            with tarfile.open(tar_path, "r:") as archive:
                for member in archive:
                    stem, suffix = os.path.splitext(os.path.basename(member.name))
                    if member.isfile() and suffix.lower() in _IMAGE_SUFFIXES:
                        yield stem, _ImageFile(os.fspath(tar_path), member.offset_data, member.size)
        except (tarfile.TarError, OSError) as error:
            report.skip("source_unreadable", f"{tar_path.name}: {error}")


def _find_images(
    manual_dir: epath.Path,
    *,
    landmark_of: dict[str, int],
    conflicting: set[str],
    wanted: Callable[[int], bool],
    report: BuildReport,
) -> dict[str, _ImageFile]:
    """Finds the image files and returns those of listed images whose landmark is `wanted`."""
    tree = manual_dir / TRAIN_DIR
    tars = sorted(manual_dir.glob(TAR_PATTERN))
    if tree.is_dir():
        if tars:
            logging.warning("Reading images from %s; ignoring %d archives.", tree, len(tars))
        files = _walk_tree(os.fspath(tree), report)
    else:
        logging.info("Reading images from %d archives %s...", len(tars), TAR_PATTERN)
        files = _walk_tars(tars, report)
    found: dict[str, _ImageFile] = {}
    seen: set[str] = set()
    for image_id, image_file in tfds.core.utils.tqdm(files, desc="Finding images", unit=" files"):
        report.summary["image_files"] += 1
        if image_id in seen:
            report.skip("image_duplicate_file", f"{image_id} ({image_file.path})")
            continue
        seen.add(image_id)
        landmark_id = landmark_of.get(image_id)
        if landmark_id is None:
            if image_id not in conflicting:  # Conflicting ids are already reported.
                report.skip("image_not_listed", image_id)
        elif wanted(landmark_id):
            found[image_id] = image_file
    return found


def _decodable_ids(
    image_ids: Sequence[str],
    images: dict[str, _ImageFile],
    *,
    max_side: int,
    executor: futures.Executor,
    report: BuildReport,
) -> list[str]:
    """The ids among `image_ids` whose files decode; the others are reported as corrupt."""
    ok = executor.map(lambda i: _is_decodable(images[i], max_side=max_side), image_ids)
    valid = []
    for image_id, decodable in zip(image_ids, ok, strict=True):
        if decodable:
            valid.append(image_id)
        else:
            report.skip("image_corrupt", image_id)
    return valid


def _select_classes(
    candidates: dict[int, list[str]],
    images: dict[str, _ImageFile],
    *,
    num_classes: int,
    max_side: int,
    report: BuildReport,
) -> list[tuple[int, list[str]]]:
    """The top `num_classes` landmarks by decodable-image count (ties by id), with their images.

    A heap holds (-count, landmark id, exact?) with count the number of files present (an upper
    bound) until the landmark's images are decoded, the exact count after. A landmark is taken
    when it pops with an exact count: every other landmark has at most that many, or as many
    and a larger id. Only landmarks that reach the top are decoded.
    """
    heap = [(-len(ids), landmark_id, False) for landmark_id, ids in candidates.items()]
    heapq.heapify(heap)
    decodable: dict[int, list[str]] = {}
    selected: list[tuple[int, list[str]]] = []
    with (
        futures.ThreadPoolExecutor(_DECODE_THREADS) as executor,
        tfds.core.utils.tqdm(
            total=num_classes, desc="Checking images of candidate landmarks", unit=" classes"
        ) as progress,
    ):
        while heap and len(selected) < num_classes:
            negative_count, landmark_id, exact = heapq.heappop(heap)
            if -negative_count < MIN_IMAGES_PER_CLASS:
                break  # Every landmark left has fewer images still.
            if exact:
                selected.append((landmark_id, decodable[landmark_id]))
                progress.update(1)
                continue
            valid = _decodable_ids(
                candidates[landmark_id],
                images,
                max_side=max_side,
                executor=executor,
                report=report,
            )
            decodable[landmark_id] = valid
            heapq.heappush(heap, (-len(valid), landmark_id, True))
    report.summary["landmarks_decoded"] = len(decodable)
    chosen = {landmark_id for landmark_id, _ in selected}
    report.summary["images_of_unselected_landmarks"] = sum(
        len(decodable.get(landmark_id, ids))
        for landmark_id, ids in candidates.items()
        if landmark_id not in chosen
    )
    return selected


def _check_manual_dir(manual_dir: epath.Path) -> None:
    """Raises ManualDirError naming each GLDv2 file that the manual directory lacks."""
    missing = []
    if not (manual_dir / TRAIN_CSV).is_file():
        missing.append(TRAIN_CSV)
    if not (manual_dir / TRAIN_DIR).is_dir() and not list(manual_dir.glob(TAR_PATTERN)):
        missing.append(f"the images ({TRAIN_DIR}/ or {TAR_PATTERN})")
    if not (manual_dir / COORDINATES_CSV).is_file():
        missing.append(COORDINATES_CSV)
    if missing:
        raise ManualDirError(
            f"The manual directory {manual_dir} lacks {', '.join(missing)}.\n\n"
            f"{MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )


def _plan(manual_dir: epath.Path, config: LandmarkConfig, report: BuildReport) -> _Plan:
    """The scan: reads the CSVs, finds and checks images, picks the classes, splits them."""
    _check_manual_dir(manual_dir)
    coordinates = _read_coordinates(manual_dir / COORDINATES_CSV, report)
    landmark_of, conflicting = _read_train_csv(manual_dir / TRAIN_CSV, report)
    report.summary["listed_images"] = len(landmark_of)

    listed_per_landmark = collections.Counter(landmark_of.values())
    report.summary["listed_landmarks"] = len(listed_per_landmark)
    for landmark_id in sorted(listed_per_landmark):
        if landmark_id not in coordinates:
            report.skip("landmark_without_coordinates", str(landmark_id))
            report.summary["images_of_landmarks_without_coordinates"] += listed_per_landmark[
                landmark_id
            ]

    images = _find_images(
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

    selected = _select_classes(
        candidates,
        images,
        num_classes=config.num_classes,
        max_side=config.max_side,
        report=report,
    )
    if len(selected) < config.num_classes:
        logging.error("%s", format_build_report(report.to_json(config=config.name)))
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
        # array_record by default: grain reads it with random access (DESIGN.md §3).
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._report: BuildReport | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        config: LandmarkConfig = self.builder_config
        return self.dataset_info_from_configs(
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
            citation=_GLDV2_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as error:  # TFDS's way of saying "missing or empty".
            raise ManualDirError(str(error)) from error
        self._report = BuildReport()
        plan = _plan(manual_dir, self.builder_config, self._report)
        self._report.kept["classes"] = len(plan.class_ids)
        self.info.features["label"].names = [str(landmark_id) for landmark_id in plan.class_ids]
        return {
            "train": self._generate_examples(plan.train, split="train"),
            "test": self._generate_examples(plan.test, split="test"),
        }

    def _generate_examples(self, examples: Sequence[_Example], *, split: str):
        config: LandmarkConfig = self.builder_config
        encode = lambda e: _reencode(
            e.image_file, max_side=config.max_side, quality=config.jpeg_quality
        )
        with futures.ThreadPoolExecutor(_DECODE_THREADS) as executor:
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

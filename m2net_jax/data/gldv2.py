"""Reading a GLDv2 manual directory: its two CSVs, its image files, and decoding the images.

GLDv2 cannot be downloaded by code, so the Landmark-420/732 builders read a manual directory laid
out as GLDv2 ships it (`MANUAL_DOWNLOAD_INSTRUCTIONS`): `train.csv`, the images as an extracted
`train/` tree or the `images_NNN.tar` archives (read in place, never extracted), and the
`landmark_coordinates.csv` the user makes. CSVs are read by their headers; every row or file that
cannot be used is counted in the build report under its reason, never a crash.
"""

import csv
import dataclasses
import io
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence

import PIL.Image
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from m2net_jax import geo
from m2net_jax.data.landmark_report import BuildReport

TRAIN_CSV = "train.csv"
COORDINATES_CSV = "landmark_coordinates.csv"
TRAIN_DIR = "train"
TAR_PATTERN = "images_*.tar"

# Decoding and resizing run in C with the GIL released, so threads give real parallelism.
DECODE_THREADS = min(8, os.cpu_count() or 1)
_IMAGE_SUFFIXES = (".jpg", ".jpeg")
# PIL's ways of saying "this is not a decodable image" (truncated data, unknown format, bad
# header fields, absurd dimensions).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)

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


class ManualDirError(FileNotFoundError):
    """The manual directory is missing, empty or lacks one of the GLDv2 files."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImageFile:
    """Where an image's bytes are: a whole file, or `size` bytes at `offset` inside a tar."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


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


def reencode_jpeg(image_file: ImageFile, *, max_side: int, quality: int) -> bytes | None:
    """The stored JPEG for one image, or None when it cannot be read or decoded."""
    try:
        image = load_image(image_file.read(), max_side=max_side)
    except _DECODE_ERRORS:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def is_decodable(image_file: ImageFile, *, max_side: int) -> bool:
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


def read_train_csv(path: epath.Path, report: BuildReport) -> tuple[dict[str, int], set[str]]:
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


def read_coordinates(path: epath.Path, report: BuildReport) -> dict[int, tuple[float, float]]:
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


def _walk_tree(tree: str, report: BuildReport) -> Iterator[tuple[str, ImageFile]]:
    """Yields (image id, file) for the JPEGs under `tree`, in sorted path order."""

    def on_error(error: OSError) -> None:
        report.skip("source_unreadable", f"{error.filename}: {error.strerror}")

    for root, dirs, names in os.walk(tree, onerror=on_error):
        dirs.sort()
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in _IMAGE_SUFFIXES:
                yield stem, ImageFile(os.path.join(root, name))


def _walk_tars(tars: Sequence[epath.Path], report: BuildReport) -> Iterator[tuple[str, ImageFile]]:
    """Yields (image id, member location) for the JPEG members of uncompressed tar archives."""
    for tar_path in tars:
        try:
            # Iterating reads one header at a time and seeks over the data: no extraction.
            with tarfile.open(tar_path, "r:") as archive:
                for member in archive:
                    stem, suffix = os.path.splitext(os.path.basename(member.name))
                    if member.isfile() and suffix.lower() in _IMAGE_SUFFIXES:
                        yield stem, ImageFile(os.fspath(tar_path), member.offset_data, member.size)
        except (tarfile.TarError, OSError) as error:
            report.skip("source_unreadable", f"{tar_path.name}: {error}")


def find_images(
    manual_dir: epath.Path,
    *,
    landmark_of: dict[str, int],
    conflicting: set[str],
    wanted: Callable[[int], bool],
    report: BuildReport,
) -> dict[str, ImageFile]:
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
    found: dict[str, ImageFile] = {}
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


def check_manual_dir(manual_dir: epath.Path) -> None:
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

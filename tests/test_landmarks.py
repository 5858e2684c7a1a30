"""Tests of the Landmark-420/732 builders on a small fake GLDv2 manual directory.

The fake directory plants one instance (or a few) of every kind of bad input the builder must
skip and report, next to seven landmarks with valid coordinates; builds use a custom
`LandmarkConfig` with 5 classes. What the build must produce is written out here by hand.
"""

import csv
import hashlib
import io
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from m2net_jax.data import landmarks

# landmark id -> (number of image files, coordinates); None: no coordinates row.
_LANDMARKS = {
    101: (12, (48.858222, 2.2945)),  # one file truncated -> 11 decodable
    102: (10, (-33.856784, 151.215297)),
    103: (9, (40.689247, -74.044502)),  # plus one listed image without a file
    104: (8, (27.175015, 78.042155)),
    105: (8, (-22.951916, -43.210487)),  # ties with 104; 104 ranks first by id
    106: (10, (41.890210, 12.492231)),  # three files corrupt -> 7: drops below 104 and 105
    107: (3, (29.979235, 31.134202)),
    112: (3, (51.5007, -0.1246)),  # its coordinates row appears twice
    108: (15, None),  # no coordinates row
    109: (14, None),  # latitude 95
    110: (13, None),  # latitude unparsable
    111: (13, None),  # two different coordinates rows
}
_EXPECTED_CLASSES = [101, 102, 103, 104, 105]
# Decodable images per class and max(1, round(n * 0.25)) of them in test.
_EXPECTED_COUNTS = {101: 11, 102: 10, 103: 9, 104: 8, 105: 8}
_EXPECTED_TEST = {101: 3, 102: 3, 103: 2, 104: 2, 105: 2}

_CONFIG = landmarks.LandmarkConfig(
    name="test5", num_classes=5, test_fraction=0.25, max_side=16, jpeg_quality=95
)


def _image_id(landmark_id: int, k: int) -> str:
    return hashlib.sha1(f"{landmark_id}/{k}".encode()).hexdigest()[:16]


def _colour(image_id: str) -> tuple[int, int, int]:
    digest = hashlib.sha1(image_id.encode()).digest()
    return (40 + digest[0] % 176, 40 + digest[1] % 176, 40 + digest[2] % 176)


def _jpeg(image_id: str) -> bytes:
    """A 24x18 JPEG of one colour (a function of the id), so a stored image can be traced."""
    pixels = np.broadcast_to(np.array(_colour(image_id), np.uint8), (18, 24, 3))
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _tree_path(image_id: str) -> str:
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _write_fake_gldv2(root: Path, *, layout: str, shuffle_rows: bool = False) -> dict:
    """Writes a fake GLDv2 manual directory; returns the planted bad inputs by reason."""
    root.mkdir(parents=True)
    files: list[tuple[str, bytes]] = []  # (path relative to the image root, content)
    train_rows: list[list[str]] = []  # landmark_id, url, id  (the header's column order)
    planted: dict[str, list[str]] = {}

    for landmark_id, (count, _) in _LANDMARKS.items():
        for k in range(count):
            image_id = _image_id(landmark_id, k)
            train_rows.append([str(landmark_id), f"http://x/{image_id}.jpg", image_id])
            files.append((_tree_path(image_id), _jpeg(image_id)))

    def replace(image_id: str, content: bytes, reason: str) -> None:
        index = [path for path, _ in files].index(_tree_path(image_id))
        files[index] = (_tree_path(image_id), content)
        planted.setdefault(reason, []).append(image_id)

    truncated = _jpeg(_image_id(101, 0))
    replace(_image_id(101, 0), truncated[: len(truncated) // 2], "image_corrupt")
    replace(_image_id(106, 0), b"this is not a jpeg", "image_corrupt")
    replace(_image_id(106, 1), b"", "image_corrupt")
    replace(_image_id(106, 2), _jpeg(_image_id(106, 2))[:-300], "image_corrupt")

    missing = _image_id(103, 99)
    train_rows.append(["103", "http://x/missing.jpg", missing])
    planted["image_missing"] = [missing]
    unlisted = [_image_id(999, 0), _image_id(999, 1)]
    files += [(_tree_path(i), _jpeg(i)) for i in unlisted]
    planted["image_not_listed"] = unlisted
    duplicate = _image_id(104, 0)
    files.append((f"z/z/z/{duplicate}.jpg", _jpeg(duplicate)))
    planted["image_duplicate_file"] = [duplicate]
    conflicting = _image_id(555, 0)
    train_rows += [["102", "http://x/c.jpg", conflicting], ["104", "http://x/c.jpg", conflicting]]
    files.append((_tree_path(conflicting), _jpeg(conflicting)))
    planted["train_csv_conflicting_id"] = [conflicting]
    train_rows.append(["102", "http://x/again.jpg", _image_id(102, 3)])
    planted["train_csv_duplicate_id"] = [_image_id(102, 3)]
    train_rows += [["101", "only-two-fields"], ["abc", "http://x/y.jpg", "0123456789abcdef"]]
    train_rows += [["101", "http://x/no-id.jpg", ""]]

    coordinate_rows = [  # longitude, landmark_id, latitude (the header's column order)
        [str(lon), str(landmark_id), str(lat)]
        for landmark_id, (_, location) in _LANDMARKS.items()
        if location is not None
        for lat, lon in [location]
    ]
    coordinate_rows += [
        ["-0.1246", "112", "51.5007"],  # duplicate of 112's row, same values
        ["10.0", "109", "95.0"],  # latitude out of range
        ["10.0", "113", "nan"],
        ["-181.0", "114", "10.0"],
        ["10.0", "110", "abc"],  # unparsable
        ["10.0", "111", "20.0"],
        ["11.0", "111", "21.0"],  # conflicting
        ["10.0", "1x", "20.0"],  # non-integer landmark id
        ["10.0", "20.0"],  # wrong field count
    ]

    if shuffle_rows:
        rng = random.Random(0)
        rng.shuffle(train_rows)
        rng.shuffle(coordinate_rows)
        rng.shuffle(files)
    with open(root / landmarks.TRAIN_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["landmark_id", "url", "id"])
        writer.writerows(train_rows)
        f.write("\n")  # a blank line carries no data and is not an error
    # A spreadsheet's byte-order mark before the header.
    with open(root / landmarks.COORDINATES_CSV, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(["longitude", "landmark_id", "latitude"])
        writer.writerows(coordinate_rows)

    if layout == "tree":
        for path, content in files:
            (root / "train" / path).parent.mkdir(parents=True, exist_ok=True)
            (root / "train" / path).write_bytes(content)
    else:
        halves = [files[: len(files) // 2], files[len(files) // 2 :]]
        for index, half in enumerate(halves):
            with tarfile.open(root / f"images_{index:03d}.tar", "w") as archive:
                for path, content in half:
                    info = tarfile.TarInfo(path)
                    info.size = len(content)
                    archive.addfile(info, io.BytesIO(content))
        (root / "images_002.tar").write_bytes(b"not a tar archive" * 100)
        planted["source_unreadable"] = ["images_002.tar"]
    return planted


def _build(manual_dir: Path, data_dir: Path, config=_CONFIG) -> landmarks.LandmarkBuilder:
    builder = landmarks.Landmark420(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def _examples(builder) -> dict[str, dict[str, dict]]:
    """{split: {image_id: example}} read back through the random-access data source."""
    result = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        examples = [source[i] for i in range(len(source))]
        result[split] = {e["image_id"].decode(): e for e in examples}
    return result


@pytest.fixture(scope="module")
def tree_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    planted = _write_fake_gldv2(root / "manual", layout="tree")
    builder = _build(root / "manual", root / "tfds")
    return builder, planted, _examples(builder), root / "manual"


def _dms(value: float) -> list[float]:
    """Independent D/M/S of one decimal coordinate: [sign, degrees, minutes, seconds]."""
    magnitude = abs(value)
    degrees = int(magnitude)
    minutes = int((magnitude - degrees) * 60)
    seconds = (magnitude - degrees - minutes / 60) * 3600
    return [1.0 if value >= 0 else -1.0, degrees, minutes, seconds]


def test_classes_are_the_top_landmarks_by_decodable_images_ties_by_id(tree_build):
    builder, _, _, _ = tree_build
    assert builder.info.features["label"].names == [str(i) for i in _EXPECTED_CLASSES]
    reopened = landmarks.Landmark420(config=_CONFIG, data_dir=builder.data_dir_root)
    assert reopened.info.features["label"].names == [str(i) for i in _EXPECTED_CLASSES]


def test_each_class_split_with_its_test_share_and_splits_disjoint(tree_build):
    builder, _, examples, _ = tree_build
    assert not set(examples["train"]) & set(examples["test"])
    for split in ("train", "test"):
        assert builder.info.splits[split].num_examples == len(examples[split])
    for label, landmark_id in enumerate(_EXPECTED_CLASSES):
        n_test = sum(e["label"] == label for e in examples["test"].values())
        n_train = sum(e["label"] == label for e in examples["train"].values())
        assert n_test == _EXPECTED_TEST[landmark_id]
        assert n_train + n_test == _EXPECTED_COUNTS[landmark_id]


def test_examples_carry_their_landmark_coordinates_and_image(tree_build):
    _, _, examples, _ = tree_build
    for example in [*examples["train"].values(), *examples["test"].values()]:
        landmark_id = _EXPECTED_CLASSES[example["label"]]
        latitude, longitude = _LANDMARKS[landmark_id][1]
        assert example["landmark_id"] == landmark_id
        assert example["latitude"] == np.float32(latitude)
        assert example["longitude"] == np.float32(longitude)
        np.testing.assert_allclose(example["location"], _dms(latitude) + _dms(longitude), atol=1e-3)
        image = example["image"]
        assert image.shape == (16, 21, 3)  # 24x18 with the shorter side capped at 16
        image_id = example["image_id"].decode()
        np.testing.assert_allclose(image.mean(axis=(0, 1)), _colour(image_id), atol=6)


def test_written_as_array_record(tree_build):
    builder, _, _, _ = tree_build
    assert builder.info.file_format.value == "array_record"
    assert list(Path(builder.data_dir).glob("*.array_record*"))


def test_every_bad_input_skipped_and_reported_under_its_reason(tree_build):
    builder, planted, _, _ = tree_build
    report = builder.build_report()
    assert report == landmarks.read_build_report(builder.data_dir)
    skipped = report["skipped"]
    for reason, ids in planted.items():
        assert skipped[reason]["count"] == len(ids), reason
        for image_id in ids:
            assert any(image_id in example for example in skipped[reason]["examples"]), reason
    expected_counts = {
        "train_csv_malformed_row": 3,  # wrong field count, non-integer landmark_id, empty id
        "coordinates_malformed_row": 3,  # wrong field count, "1x", latitude "abc"
        "coordinates_out_of_range": 3,  # latitude 95, NaN, longitude -181
        "coordinates_duplicate_row": 1,
        "coordinates_conflicting": 1,
        "landmark_without_coordinates": 4,
    }
    for reason, count in expected_counts.items():
        assert skipped[reason]["count"] == count, reason
    assert set(skipped) == set(planted) | set(expected_counts)
    assert set(skipped["landmark_without_coordinates"]["examples"]) == {"108", "109", "110", "111"}
    assert report["kept"] == {"classes": 5, "train": 34, "test": 12}

    # Every listed image is kept or accounted for.
    summary = report["summary"]
    listed = sum(count for count, _ in _LANDMARKS.values()) + 1  # + the missing one
    assert summary["listed_images"] == listed
    assert listed == (
        report["kept"]["train"]
        + report["kept"]["test"]
        + summary["images_of_unselected_landmarks"]
        + summary["images_of_landmarks_without_coordinates"]
        + skipped["image_missing"]["count"]
        + skipped["image_corrupt"]["count"]
    )
    text = landmarks.format_build_report(report)
    assert "image_corrupt" in text and planted["image_corrupt"][0] in text


def test_tar_layout_and_shuffled_rows_build_identical_examples(tree_build, tmp_path):
    builder, _, tree_examples, _ = tree_build
    planted = _write_fake_gldv2(tmp_path / "manual", layout="tar", shuffle_rows=True)
    tar_builder = _build(tmp_path / "manual", tmp_path / "tfds")
    tar_examples = _examples(tar_builder)
    assert tar_builder.info.features["label"].names == builder.info.features["label"].names
    for split in ("train", "test"):
        assert tar_examples[split].keys() == tree_examples[split].keys()
        for image_id, example in tar_examples[split].items():
            other = tree_examples[split][image_id]
            assert example.keys() == other.keys()
            for key in example:
                np.testing.assert_array_equal(example[key], other[key], err_msg=key)
    skipped = tar_builder.build_report()["skipped"]
    assert skipped["source_unreadable"]["count"] == 1
    assert "images_002.tar" in skipped["source_unreadable"]["examples"][0]
    for reason, ids in planted.items():
        assert skipped[reason]["count"] == len(ids), reason


def test_rebuild_gives_identical_examples(tree_build, tmp_path):
    _, _, first, _ = tree_build
    manual = tmp_path / "manual"
    _write_fake_gldv2(manual, layout="tree")
    second = _examples(_build(manual, tmp_path / "tfds"))
    for split in ("train", "test"):
        assert second[split].keys() == first[split].keys()
        for image_id, example in second[split].items():
            np.testing.assert_array_equal(example["image"], first[split][image_id]["image"])
            assert example["label"] == first[split][image_id]["label"]


def test_split_is_independent_of_id_order_and_keeps_one_test_image():
    ids = [f"{i:016x}" for i in range(40)]
    train, test = landmarks.split_class_images(ids, test_fraction=0.1)
    shuffled = list(reversed(ids))
    assert landmarks.split_class_images(shuffled, test_fraction=0.1) == (train, test)
    assert len(test) == 4 and sorted(train + test) == ids
    assert landmarks.split_class_images(ids[:2], test_fraction=0.1)[1] != []
    assert len(landmarks.split_class_images(ids[:2], test_fraction=0.9)[0]) == 1


def test_too_few_eligible_landmarks_is_a_clear_error(tree_build, tmp_path):
    *_, manual = tree_build
    config = landmarks.LandmarkConfig(name="test9", num_classes=9, test_fraction=0.25)
    # Eligible: 101-107 and 112, eight landmarks.
    with pytest.raises(landmarks.TooFewLandmarksError, match=r"only 8 eligible.*needs 9"):
        _build(manual, tmp_path / "tfds", config=config)


def test_missing_or_incomplete_manual_dir_is_a_clear_error(tmp_path):
    with pytest.raises(landmarks.ManualDirError, match="landmark_coordinates.csv"):
        _build(tmp_path / "does-not-exist", tmp_path / "tfds")
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.csv").write_text("id,url,landmark_id\n")
    with pytest.raises(landmarks.ManualDirError, match=r"lacks the images.*landmark_coord"):
        _build(manual, tmp_path / "tfds")


def test_header_without_required_column_is_a_clear_error(tree_build, tmp_path):
    *_, fake_gldv2 = tree_build
    manual = tmp_path / "manual"
    shutil.copytree(fake_gldv2, manual)
    (manual / "landmark_coordinates.csv").write_text("landmark_id,lat,lon\n1,2,3\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['latitude', 'longitude'\]"):
        _build(manual, tmp_path / "tfds")


def test_builders_registered_with_paper_class_counts():
    for name, num_classes in (("landmark420", 420), ("landmark732", 732)):
        builder = tfds.builder(name, data_dir="/nonexistent-tfds-dir")
        assert builder.builder_config.num_classes == num_classes
        assert builder.info.features["label"].num_classes == num_classes
        assert builder.info.file_format.value == "array_record"
        assert "train.csv" in builder.MANUAL_DOWNLOAD_INSTRUCTIONS


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("failure", ["manual_dir_missing", "too_few_landmarks"])
def test_failed_build_leaves_data_dir_as_it_found_it(tree_build, tmp_path, failure):
    *_, manual = tree_build
    config = _CONFIG
    error = landmarks.ManualDirError
    if failure == "manual_dir_missing":
        manual = tmp_path / "does-not-exist"
    else:
        config = landmarks.LandmarkConfig(name="test9", num_classes=9, test_fraction=0.25)
        error = landmarks.TooFewLandmarksError
    fresh = tmp_path / "fresh-tfds"
    with pytest.raises(error):
        _build(manual, fresh, config=config)
    assert not fresh.exists(), _tree(fresh)
    # A data_dir in use: another config of the same dataset and the download folders exist.
    used = tmp_path / "used-tfds"
    (used / "downloads" / "extracted").mkdir(parents=True)
    (used / "landmark420" / "default" / "1.0.0").mkdir(parents=True)
    (used / "landmark420" / "default" / "1.0.0" / "dataset_info.json").write_text("{}")
    before = _tree(used)
    with pytest.raises(error):
        _build(manual, used, config=config)
    assert _tree(used) == before


def test_builders_have_a_description_and_cite_the_paper_and_gldv2():
    for name, num_classes in (("landmark420", 420), ("landmark732", 732)):
        info = tfds.builder(name, data_dir="/nonexistent-tfds-dir").info
        citation = " ".join(info.citation.split())
        assert "Moving-Mobile-Network for Landmark Recognition" in citation
        assert "Google Landmarks Dataset v2 -- A Large-Scale Benchmark" in citation
        assert r"Andr{\'e}" in citation  # BibTeX's accent, not a Python escape
        assert citation.count("@") == 2 and citation.count("{") == citation.count("}")
        assert f"the {num_classes} landmarks" in info.description
        assert info.homepage == "https://github.com/cvdfoundation/google-landmark"

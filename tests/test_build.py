"""Tests of the dataset build CLI (`python -m m2net_jax.data.build`) and `build_dataset`."""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from m2net_jax.data import build, landmarks

_REPO = Path(__file__).resolve().parents[1]


def _write_minimal_gldv2(root: Path, *, num_landmarks: int) -> None:
    """`num_landmarks` landmarks with two 8x8 images each: the smallest input landmark420 takes."""
    (root / "train").mkdir(parents=True)
    with (
        open(root / "train.csv", "w", newline="") as train_csv,
        open(root / "landmark_coordinates.csv", "w", newline="") as coordinates_csv,
    ):
        train, coordinates = csv.writer(train_csv), csv.writer(coordinates_csv)
        train.writerow(["id", "url", "landmark_id"])
        coordinates.writerow(["landmark_id", "latitude", "longitude"])
        for landmark_id in range(num_landmarks):
            coordinates.writerow([landmark_id, -60 + landmark_id * 0.25, landmark_id * 0.5 - 100])
            for k in range(2):
                image_id = f"{landmark_id:014x}{k:02x}"
                train.writerow([image_id, "http://example.com", landmark_id])
                buffer = io.BytesIO()
                colour = np.full((8, 8, 3), (landmark_id * 7 + k * 50) % 256, np.uint8)
                PIL.Image.fromarray(colour).save(buffer, format="JPEG")
                (root / "train" / f"{image_id}.jpg").write_bytes(buffer.getvalue())


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "m2net_jax.data.build", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        cwd=cwd,
        timeout=300,
    )


def test_cli_builds_landmark420_and_prints_the_report(tmp_path):
    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    _write_minimal_gldv2(manual, num_landmarks=420)
    result = _run_cli(
        "--dataset=landmark420", f"--manual_dir={manual}", f"--data_dir={data_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept 420 classes, 420 train and 420 test images" in result.stdout
    assert "Nothing skipped." in result.stdout
    shards = list((data_dir / "landmark420" / "default" / "1.0.0").glob("*.array_record-*"))
    assert len(shards) == 2


def test_cli_with_empty_manual_dir_exits_with_the_instructions(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run_cli(
        "--dataset=landmark732",
        f"--manual_dir={tmp_path / 'empty'}",
        f"--data_dir={tmp_path / 'tfds'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Cannot build landmark732" in result.stderr
    assert landmarks.MANUAL_DOWNLOAD_INSTRUCTIONS.splitlines()[0] in result.stderr


def test_build_dataset_raises_for_a_missing_manual_dir(tmp_path):
    with pytest.raises(landmarks.ManualDirError, match="does not exist or is empty"):
        build.build_dataset(
            "landmark420", manual_dir=str(tmp_path / "nowhere"), data_dir=str(tmp_path / "tfds")
        )


def test_build_dataset_builds_geo_twins_as_array_record(tmp_path):
    builder = build.build_dataset("geo_twins/smoke", data_dir=str(tmp_path))
    assert builder.info.splits["train"].num_examples > 0
    assert list(Path(builder.data_dir).glob("geo_twins-train.array_record-*"))

"""The closing report of a Landmark-420/732 build: what was kept, what was skipped and why.

Every bad input of a GLDv2 build (malformed CSV row, conflicting duplicate, landmark without
coordinates, missing, unlisted or corrupt image, unreadable archive) is skipped, counted under its
reason (`SKIP_REASONS`) and listed with its first few ids: never a crash and never a silent loss.
The builder logs the report at the end of a build and writes it as `build_report.json` next to
the dataset (`read_build_report`, `format_build_report`).
"""

import collections
import json

from etils import epath

BUILD_REPORT_FILENAME = "build_report.json"

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

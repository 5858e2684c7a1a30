"""Which GLDv2 landmarks become the classes of Landmark-420/732, and which images go to test.

The paper keeps the landmarks whose location is known and takes those with the most images
(§4.1.1). `select_classes` ranks the candidates by their number of *decodable* images, ties by
landmark id, decoding only the landmarks that compete for the top K (a heap ordered by an upper
bound, the files present). `split_class_images` then splits each class into train/test by a
fixed pseudo-random order of its image ids, independent of file and CSV order.
"""

import hashlib
import heapq
import math
from collections.abc import Iterable, Sequence
from concurrent import futures

import tensorflow_datasets as tfds

from m2net_jax.data.gldv2 import DECODE_THREADS, ImageFile, is_decodable
from m2net_jax.data.landmark_report import BuildReport

# A class needs one image in each split.
MIN_IMAGES_PER_CLASS = 2


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


def _decodable_ids(
    image_ids: Sequence[str],
    images: dict[str, ImageFile],
    *,
    max_side: int,
    executor: futures.Executor,
    report: BuildReport,
) -> list[str]:
    """The ids among `image_ids` whose files decode; the others are reported as corrupt."""
    ok = executor.map(lambda i: is_decodable(images[i], max_side=max_side), image_ids)
    valid = []
    for image_id, decodable in zip(image_ids, ok, strict=True):
        if decodable:
            valid.append(image_id)
        else:
            report.skip("image_corrupt", image_id)
    return valid


def select_classes(
    candidates: dict[int, list[str]],
    images: dict[str, ImageFile],
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
        futures.ThreadPoolExecutor(DECODE_THREADS) as executor,
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

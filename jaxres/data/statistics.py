"""Dataset statistics: per-channel pixel mean / std and class counts of a record source."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxres.console import progress_bar
from jaxres.data import decode


def dataset_statistics(source: Any, max_images: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-channel pixel mean / std (uint8 units) over a seeded sample, and the class counts.

    Args:
      source: any record source (`sources.open_source`).
      max_images: decode at most this many images (sampled without replacement; 0 = all).
      seed: the sample's seed.
    """
    n = len(source)
    count = n if max_images <= 0 else min(n, max_images)
    indices = np.sort(np.random.default_rng(seed).permutation(n)[:count])
    total, total_sq, pixels, undecodable = np.zeros(3), np.zeros(3), 0, []
    for i in progress_bar(indices, count, "statistics", unit="img"):
        record = source[int(i)]
        try:
            array = np.asarray(
                decode.decode(record["image"], record["key"]), np.float64
            ).reshape(-1, 3)
        except Exception:  # noqa: BLE001 - listed in the result.
            undecodable.append(record["key"])
            continue
        total += array.sum(0)
        total_sq += np.square(array).sum(0)
        pixels += len(array)
    mean = total / max(pixels, 1)
    std = np.sqrt(np.maximum(total_sq / max(pixels, 1) - np.square(mean), 0))
    counts = np.bincount(np.asarray(source.labels, np.int64), minlength=len(source.class_names))
    return {
        "num_examples": n,
        "images_used": count - len(undecodable),
        "undecodable": undecodable,
        "mean": [round(float(m), 3) for m in mean],
        "std": [round(float(s), 3) for s in std],
        "class_counts": dict(zip(source.class_names, counts.tolist())),
    }

"""Features of a named layer, from a jitted sharded forward pass, cached on disk.

    extractor = FeatureExtractor(runs.load("runs/r50", "best"), layer="pre_logits")
    feats, labels, mask = cached_features(extractor, source, {"name": ..., "split": ...}, "W/features")

Layers are the keys of the model's feature dict: "stem", "stage1".."stage4",
"pre_logits" (default), "logits". Spatial layers are global-average-pooled to
[N, C] unless `pool=False`. Views ("center", "flip", "10crop") are averaged.

The cache is a directory per (model, checkpoint directory + step + a digest of
the weights, layer, pooling, preprocessing, dataset, split, count): the hash of
that description names the directory, so a changed setting finds no cache and
recomputes, and an unchanged one loads `features-NNNNN.npy` chunks without a
forward pass. `metadata.json` is written last, into a temporary directory that
is renamed into place: a cache directory exists only when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxres import parallel, runs
from jaxres.config_transfer import DEFAULT_LAYER
from jaxres.data import preprocessing
from jaxres.errors import ConfigError, unknown_name
from jaxres.console import progress_bar

CACHE_FORMAT = 1


def layer_names(loaded: runs.LoadedRun) -> list[str]:
    """The layer names `loaded`'s model returns features for."""
    size = loaded.preprocessing.image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    _, features = jax.eval_shape(
        functools.partial(loaded.model.apply, train=False), loaded.variables, x
    )
    return list(features)


def _features(variables, images, *, spec: runs.ModelSpec, layer: str, pool: bool) -> jax.Array:
    _, features, k = spec.apply(variables, images)
    f = features[layer].astype(jnp.float32)
    if pool and f.ndim == 4:
        f = f.mean(axis=(1, 2))
    return f.reshape((-1, k) + f.shape[1:]).mean(axis=1)


class FeatureExtractor:
    """A run's features of one layer over a source, batch-sharded over the mesh.

    Args:
      member: from `jaxres.runs.load`.
      layer: a name from `layer_names(member)`.
      pool: global-average-pool spatial layers to [N, C].
      views: "center", "flip" (centre + mirror, averaged) or "10crop".
      image_size / crop_ratio: preprocessing (default: the run's evaluation settings).
      mesh: default: every device.
    """

    def __init__(
        self,
        member: runs.LoadedRun,
        layer: str = DEFAULT_LAYER,
        pool: bool = True,
        views: str = "center",
        image_size: int | None = None,
        crop_ratio: float | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        valid = layer_names(member)
        if layer not in valid:
            raise ConfigError(unknown_name("feature layer", layer, valid))
        self.member, self.layer, self.pool, self.views = member, layer, pool, views
        # The run's own evaluation preprocessing; only the size and crop may be set here.
        self.preprocessing = preprocessing.of(member.config, image_size or 0, crop_ratio or 0.0)
        self.image_size, self.crop_ratio = self.preprocessing.image_size, self.preprocessing.crop_ratio
        self.preprocessing.views_transform(views)  # A bad view name or decoding key fails here.
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        replicated, data = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        self.variables = parallel.replicate(member.variables, self.mesh)
        fn = functools.partial(_features, spec=runs.ModelSpec.of(member), layer=layer, pool=pool)
        self.fn = jax.jit(fn, in_shardings=(replicated, data), out_shardings=data)

    def description(self) -> dict[str, Any]:
        """What the features depend on (model, weights, layer, preprocessing): the cache key."""
        m = self.member
        return {
            "model": m.config.model.name,
            "model_overrides": m.config.model.overrides.to_dict(),
            "checkpoint_dir": os.path.abspath(m.run),
            "step": int(m.step),
            "weights_digest": weights_digest(m.variables),
            "layer": self.layer,
            "pool": self.pool,
            "preprocessing": dict(views=self.views, **self.preprocessing.description()),
        }

    def extract(
        self, source: Any, batch_size: int, on_rows=None, variables: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features [N, ...], labels [N], mask [N]) of every example of `source`, in order.

        Args:
          source: a random-access source (`jaxres.data.sources`).
          batch_size: global batch, a multiple of the device count.
          on_rows: called with each batch's host (features, labels, mask) rows as they arrive.
          variables: other weights of the same model, replicated on the mesh (an evaluator
            during training); default: the run's.
        """
        variables = self.variables if variables is None else variables
        num, batches = self.preprocessing.device_batches(source, self.views, batch_size, self.mesh)
        parts, remaining = [], len(source)
        for batch in progress_bar(batches, num, f"features {self.layer}"):
            rows = [
                parallel.gather_rows(a)
                for a in (self.fn(variables, batch["image"]), batch["label"], batch["mask"])
            ]
            rows = [r[:remaining] for r in rows]  # The last batch's padding.
            remaining -= len(rows[0])
            if on_rows is not None:
                on_rows(*rows)
            parts.append(rows)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def weights_digest(variables: Any) -> str:
    """A short content hash of the weights: a re-trained run in the same directory is new."""
    digest = hashlib.sha1()
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(variables), key=lambda p: jax.tree_util.keystr(p[0])
    ):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]


def cache_key(description: dict[str, Any]) -> str:
    """The hash naming a cache directory."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(
    extractor: FeatureExtractor,
    source: Any,
    dataset: dict[str, Any],
    cache_dir: str,
    batch_size: int,
    chunk_rows: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`extractor.extract(source)`, read from `cache_dir` when an identical run wrote it.

    Args:
      extractor: the model, layer and preprocessing.
      source: the split's source.
      dataset: how to name the data in the key, e.g. {"name", "data_dir", "split"}.
      cache_dir: the cache root; one subdirectory per key.
      batch_size: global batch of the forward pass.
      chunk_rows: rows per `.npy` chunk file.

    Returns:
      (features, labels, mask): mask 0 marks undecodable images.
    """
    description = dict(
        extractor.description(), dataset=dataset, count=len(source), format=CACHE_FORMAT
    )
    key = cache_key(description)
    directory = os.path.join(
        cache_dir,
        f"{dataset.get('name', 'data')}-{dataset.get('split', '')}-{extractor.layer}-{key}",
    )
    if os.path.isfile(os.path.join(directory, "metadata.json")):
        return load_cache(directory)
    writer = _ChunkWriter(directory, chunk_rows) if jax.process_index() == 0 else None
    features, labels, mask = extractor.extract(source, batch_size, writer.add if writer else None)
    if writer is not None:
        writer.finish(dict(description, hash=key, dim=list(features.shape[1:])), labels, mask)
    return features, labels, mask


def load_cache(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, mask) from a complete cache directory."""
    with open(os.path.join(directory, "metadata.json")) as f:
        meta = json.load(f)
    chunks = [np.load(os.path.join(directory, name)) for name in meta["chunks"]]
    features = np.concatenate(chunks) if chunks else np.zeros([0] + meta["dim"], np.float32)
    return (
        features,
        np.load(os.path.join(directory, "labels.npy")),
        np.load(os.path.join(directory, "mask.npy")),
    )


class _ChunkWriter:
    """Writes feature rows as `.npy` chunks into a temporary directory, renamed when complete."""

    def __init__(self, directory: str, chunk_rows: int):
        self.directory, self.chunk_rows = directory, chunk_rows
        self.tmp = f"{directory}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.pending: list[np.ndarray] = []
        self.chunks: list[str] = []

    def add(self, features: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
        self.pending.append(features)
        if sum(len(p) for p in self.pending) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            name = f"features-{len(self.chunks):05d}.npy"
            np.save(os.path.join(self.tmp, name), np.concatenate(self.pending))
            self.chunks.append(name)
            self.pending = []

    def finish(self, metadata: dict[str, Any], labels: np.ndarray, mask: np.ndarray) -> None:
        self._flush()
        np.save(os.path.join(self.tmp, "labels.npy"), labels)
        np.save(os.path.join(self.tmp, "mask.npy"), mask)
        with open(os.path.join(self.tmp, "metadata.json"), "w") as f:
            json.dump(dict(metadata, chunks=self.chunks), f, indent=2, sort_keys=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        os.replace(self.tmp, self.directory)

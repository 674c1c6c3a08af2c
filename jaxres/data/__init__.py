"""Datasets: sources (random access), transforms (decode + augment) and grain pipelines."""

"""Datasets, partitioners and preprocessing pipelines."""

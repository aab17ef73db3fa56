"""Exact Euclidean distance transform (dgseg.evaluation.distance_transform) against brute force."""

import numpy as np
import pytest

from dgseg.evaluation.distance_transform import (
    euclidean_distance_transform,
    squared_edt,
    squared_edt_at,
)


def _brute_edt(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance of every voxel to the nearest zero voxel, by checking all pairs."""
    zeros = np.argwhere(~mask) * np.asarray(spacing, float)  # (Z, ndim) in mm
    every = np.argwhere(np.ones_like(mask)) * np.asarray(spacing, float)  # (N, ndim)
    if len(zeros) == 0:
        return np.full(mask.shape, np.inf)
    d = np.sqrt(((every[:, None, :] - zeros[None]) ** 2).sum(-1)).min(1)
    return d.reshape(mask.shape)


def test_edt_matches_brute_force_anisotropic():
    rng = np.random.default_rng(0)
    for _ in range(12):
        shape = tuple(rng.integers(1, 10, size=3))
        spacing = rng.uniform(0.3, 3.0, size=3)
        mask = rng.random(shape) < rng.uniform(0.6, 0.98)  # sparse zeros: long distances
        got = euclidean_distance_transform(mask, spacing)
        want = _brute_edt(mask, spacing)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_edt_other_dims_and_edge_cases():
    rng = np.random.default_rng(1)
    mask2d = rng.random((7, 9)) < 0.9
    np.testing.assert_allclose(
        euclidean_distance_transform(mask2d, (0.7, 2.0)), _brute_edt(mask2d, (0.7, 2.0))
    )
    line = np.array([0, 1, 1, 1, 1, 0, 1, 1], bool)
    np.testing.assert_allclose(euclidean_distance_transform(line, 2.0), [0, 2, 4, 4, 2, 0, 2, 4])
    assert np.isinf(euclidean_distance_transform(np.ones((3, 4, 5), bool))).all()
    assert not euclidean_distance_transform(np.zeros((3, 4, 5), bool)).any()
    with pytest.raises(ValueError, match="spacing"):
        euclidean_distance_transform(np.ones((3, 3, 3)), (1.0, 0.0, 1.0))


def test_squared_edt_at_points_equals_the_whole_map():
    rng = np.random.default_rng(2)
    for _ in range(6):
        shape = tuple(rng.integers(2, 12, size=3))
        spacing = tuple(rng.uniform(0.5, 2.0, size=3))
        features = rng.random(shape) < 0.05
        features.flat[0] = True  # at least one feature voxel
        points = np.argwhere(rng.random(shape) < 0.3)
        whole = squared_edt(features, spacing)
        np.testing.assert_array_equal(
            squared_edt_at(features, points, spacing), whole[tuple(points.T)]
        )

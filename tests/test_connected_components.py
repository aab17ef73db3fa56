"""dgseg.evaluation.connected_components against a brute-force breadth-first flood fill."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import torch

from dgseg.evaluation.connected_components import component_sizes, label_components


def _flood_fill(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Reference labelling: BFS from each unlabelled voxel in raster order."""
    max_nonzero = {6: 1, 18: 2, 26: 3}[connectivity]
    offsets = [
        o for o in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, o)) <= max_nonzero
    ]
    labels = np.zeros(mask.shape, np.int32)
    n = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start] = n
        queue = deque([start])
        while queue:
            p = queue.popleft()
            for o in offsets:
                q = tuple(p[k] + o[k] for k in range(3))
                if all(0 <= q[k] < mask.shape[k] for k in range(3)) and mask[q] and not labels[q]:
                    labels[q] = n
                    queue.append(q)
    return labels, n


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_matches_flood_fill_on_random_volumes(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(25):
        shape = tuple(int(s) for s in rng.integers(1, 9, size=3))
        mask = rng.random(shape) < rng.uniform(0.1, 0.7)
        got, n = label_components(mask, connectivity)
        want, n_want = _flood_fill(mask, connectivity)
        assert n == n_want
        np.testing.assert_array_equal(got, want)  # same numbering: raster order of first voxel


def test_connectivity_distinguishes_face_edge_corner_contacts():
    m = np.zeros((3, 3, 3), bool)
    m[0, 0, 0] = m[1, 1, 1] = True  # corner contact only
    assert label_components(m, 26)[1] == 1
    assert label_components(m, 18)[1] == 2
    m[:] = False
    m[0, 0, 0] = m[0, 1, 1] = True  # edge contact
    assert label_components(m, 18)[1] == 1 and label_components(m, 6)[1] == 2
    m[:] = False
    m[0, 0, 0] = m[0, 0, 2] = True  # a gap of one voxel separates under every connectivity
    assert label_components(m, 26)[1] == 2


def test_inputs_and_edge_cases():
    labels, n = label_components(np.zeros((4, 5, 6)))
    assert n == 0 and labels.dtype == np.int32 and not labels.any()
    full = torch.ones(3, 4, 5)
    labels, n = label_components(full)
    assert n == 1 and (labels == 1).all()
    # a comb: 40 rows of runs of two lengths, joined through the spine column
    chain = np.zeros((1, 40, 3), bool)
    chain[0, :, 1] = True
    chain[0, ::2, 0] = True
    assert label_components(chain, 6)[1] == 1
    m = np.zeros((2, 2, 6), bool)
    m[0, 0, :2] = True
    m[1, 1, 4:] = True
    labels, n = label_components(m)
    np.testing.assert_array_equal(component_sizes(labels, n), [2, 2])
    with pytest.raises(ValueError, match="connectivity"):
        label_components(m, 8)
    with pytest.raises(ValueError, match="3D"):
        label_components(np.ones((3, 3)))

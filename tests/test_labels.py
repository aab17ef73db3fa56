"""Label maps ↔ WT/TC/ET channels and label conventions."""

import numpy as np
import pytest
import torch

from dgseg.transforms import channels_to_labels, convert_labels, labels_to_channels

# value: (WT, TC, ET) by the BraTS definitions WT = 1∪2∪4, TC = 1∪4, ET = 4
TABLE = {0: (0, 0, 0), 1: (1, 1, 0), 2: (1, 0, 0), 4: (1, 1, 1)}


def test_labels_to_channels_numpy_and_torch():
    label = np.array([[0, 1], [2, 4]], np.uint8)[None]  # (1, 2, 2)
    want = np.stack([np.vectorize(lambda v, c=c: TABLE[v][c])(label) for c in range(3)]) > 0
    got = labels_to_channels(label)
    assert isinstance(got, np.ndarray) and got.dtype == bool and got.shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(got, want)
    got_t = labels_to_channels(torch.from_numpy(label).long())
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.bool
    np.testing.assert_array_equal(got_t.numpy(), want)
    # integral floats (as nibabel may load them) are accepted
    np.testing.assert_array_equal(labels_to_channels(label.astype(np.float32)), want)


def test_channels_to_labels_inverts():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(5, 6, 7))
    back = channels_to_labels(labels_to_channels(label))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)
    t = torch.from_numpy(label)
    back_t = channels_to_labels(labels_to_channels(t).float())  # float 0/1 channels too
    assert back_t.dtype == torch.uint8
    assert torch.equal(back_t, t)
    with pytest.raises(ValueError, match="3 region channels"):
        channels_to_labels(np.zeros((2, 4, 4), bool))


def test_convert_labels_conventions():
    src = np.array([0, 1, 2, 3], np.int16)
    np.testing.assert_array_equal(convert_labels(src, "brats2023"), [0, 1, 2, 4])
    np.testing.assert_array_equal(convert_labels(src, "msd"), [0, 2, 1, 4])
    np.testing.assert_array_equal(convert_labels(np.array([0, 1, 2, 4]), "brats2021"), [0, 1, 2, 4])
    got = convert_labels(torch.tensor([3, 2, 1, 0]), "msd")
    assert got.dtype == torch.uint8 and got.tolist() == [4, 1, 2, 0]


def test_unknown_values_are_named():
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        convert_labels(np.array([0, 3, 7, 1]), "brats2021")
    with pytest.raises(ValueError, match=r"\[4\]"):
        convert_labels(np.array([0, 4]), "msd")
    with pytest.raises(ValueError, match=r"\[-1, 300\]"):
        labels_to_channels(torch.tensor([-1, 0, 300]))
    with pytest.raises(ValueError, match="integers"):
        labels_to_channels(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="convention"):
        convert_labels(np.array([0, 1]), "brats1999")

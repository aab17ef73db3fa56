"""Spatial augmentation keeps image and label aligned; flips / quarter turns are permutations."""

import math

import pytest
import torch

from dgseg.transforms import random_flip, random_rot90, random_rotation

THRESHOLDS = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1)  # WT ⊇ TC ⊇ ET-like channels


def _pair(shape=(6, 7, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, *shape, generator=g)
    label = (image[:1] > THRESHOLDS).float()  # (3, D, H, W) defined by the image
    return image, label


def _aligned(image, label) -> bool:
    return torch.equal(label, (image[:1] > THRESHOLDS).float())


def _same_values(a, b) -> bool:
    return torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def test_flip_aligned_permutation_and_seeded():
    image, label = _pair()
    outcomes = set()
    for seed in range(40):
        im, lb = random_flip(image, label, torch.Generator().manual_seed(seed))
        assert _aligned(im, lb) and _same_values(im, image)
        assert im.sum().item() == pytest.approx(image.sum().item(), abs=1e-4)
        # the result is one of the 8 axis-flip combinations
        match = [
            dims
            for dims in ([], [1], [2], [3], [1, 2], [1, 3], [2, 3], [1, 2, 3])
            if torch.equal(im, image.flip(dims) if dims else image)
        ]
        assert len(match) == 1
        outcomes.add(tuple(match[0]))
        im2, lb2 = random_flip(image, label, torch.Generator().manual_seed(seed))
        assert torch.equal(im, im2) and torch.equal(lb, lb2)
    assert len(outcomes) >= 6  # p = 0.5 per axis: most combinations show up in 40 draws
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_flip(image, None, g, p=1.0)[0], image.flip([1, 2, 3]))
    assert random_flip(image, None, g)[1] is None
    assert torch.equal(random_flip(image, label, g, p=0.0)[0], image)


def test_rot90_aligned_and_exact():
    image, label = _pair(shape=(6, 6, 6))
    outcomes = set()
    for seed in range(60):
        im, lb = random_rot90(image, label, torch.Generator().manual_seed(seed))
        assert _aligned(im, lb) and _same_values(im, image)
        outcomes.add(im.numpy().tobytes())
        assert torch.equal(im, random_rot90(image, label, torch.Generator().manual_seed(seed))[0])
    assert len(outcomes) >= 8  # identity + up to 9 (plane, k) quarter/half turns
    # label map (D, H, W) works too and stays aligned
    lab3 = (image[0] > 0.5).to(torch.uint8)
    im, lb = random_rot90(image, lab3, torch.Generator().manual_seed(1), p=1.0)
    assert torch.equal(lb, (im[0] > 0.5).to(torch.uint8))


def test_rot90_keep_shape_on_non_cubic():
    image, label = _pair(shape=(4, 6, 8))
    changed = 0
    for seed in range(30):
        im, lb = random_rot90(image, label, torch.Generator().manual_seed(seed), p=1.0)
        assert im.shape == image.shape and _aligned(im, lb)  # quarter turns become half turns
        changed += not torch.equal(im, image)
    assert changed > 0


def _ball(shape, centre, radius):
    """Smooth image (radius − distance) whose level set at 0 is a ball."""
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    )
    c = torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)
    return radius - ((grid - c) ** 2).sum(0).sqrt()  # (D, H, W)


def _dice(a, b):
    return (2 * (a & b).sum() / (a.sum() + b.sum())).item()


def test_small_rotation_keeps_alignment_and_is_rigid():
    shape = (16, 28, 22)  # non-cubic: a rotation in normalised coordinates would shear
    centre = [(s - 1) / 2 for s in shape]
    off = [centre[0] + 3.0, centre[1] - 6.0, centre[2] + 2.0]
    image = torch.stack([_ball(shape, centre, 5.5), _ball(shape, off, 3.0)])  # (2, D, H, W)
    label = (image > 0).float()  # (2, D, H, W)
    moved = 0
    for seed in range(6):
        im, lb = random_rotation(
            image, label, torch.Generator().manual_seed(seed), max_degrees=25.0, p=1.0
        )
        assert set(lb.unique().tolist()) <= {0.0, 1.0}  # nearest keeps the label binary
        # label follows the image: nearest vs trilinear can differ only within a voxel of the
        # boundary, where the distance-like image is below 1 in magnitude
        differ = (lb > 0.5) != (im > 0)
        assert differ.sum() < 0.2 * lb.sum() and (im[differ].abs() < 1.0).all()
        # a ball centred in the volume is invariant under rotation about the centre: its
        # distance-like image barely changes (a shear from unequal sizes would move it by > 1)
        near = image[0] > -2.0  # within 7.5 voxels of the centre
        assert (im[0] - image[0])[near].abs().max() < 0.35
        assert _dice(lb[0] > 0.5, label[0] > 0.5) > 0.9
        # the off-centre ball keeps its distance to the centre (rigid, no shear)
        grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"))
        w = lb[1]
        cm = (grid * w).flatten(1).sum(1) / w.sum()
        r0 = math.dist(off, centre)
        assert math.dist(cm.tolist(), centre) == pytest.approx(r0, abs=0.5)
        moved += math.dist(cm.tolist(), off) > 0.5
    assert moved >= 4  # it does rotate
    im_a, lb_a = random_rotation(image, label, torch.Generator().manual_seed(3), p=1.0)
    im_b, lb_b = random_rotation(image, label, torch.Generator().manual_seed(3), p=1.0)
    assert torch.equal(im_a, im_b) and torch.equal(lb_a, lb_b)
    g = torch.Generator().manual_seed(0)
    assert random_rotation(image, None, g, p=1.0)[1] is None
    im, lb = random_rotation(image, label, g, p=0.0)
    assert im is image and lb is label


def test_bad_input():
    g = torch.Generator()
    image, label = _pair()
    with pytest.raises(ValueError, match="label shape"):
        random_flip(image, label[:, :3], g)
    with pytest.raises(ValueError, match="image"):
        random_rot90(image[0], None, g)
    with pytest.raises(ValueError, match="p must"):
        random_rotation(image, label, g, p=2.0)
    with pytest.raises(ValueError, match="max_degrees"):
        random_rotation(image, label, g, max_degrees=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    image, label = _pair(shape=(8, 8, 8))
    for fn in (random_flip, random_rot90, random_rotation):
        im_c, lb_c = fn(image, label, torch.Generator().manual_seed(4), p=1.0)
        im_g, lb_g = fn(image.cuda(), label.cuda(), torch.Generator().manual_seed(4), p=1.0)
        assert im_g.is_cuda and lb_g.is_cuda
        torch.testing.assert_close(im_g.cpu(), im_c, atol=1e-5, rtol=0)
        # nearest sampling may round a voxel exactly on a tie differently on the GPU
        assert (lb_g.cpu() != lb_c).float().mean() < 0.01

"""Sliding-window blending and flip TTA against hand-computed values and exact identities."""

import pytest
import torch

from dgseg.inference.sliding_window import (
    covering_roi,
    flip_combinations,
    gaussian_importance_map,
    predict_volume,
    sliding_window_inference,
    window_starts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """A voxel-wise predictor with 2 output channels: any correct blending reproduces it."""
    return torch.cat([2.0 * x[:, :1] - 1.0, x[:, :1] ** 2 - x[:, 1:2]], dim=1)


def test_window_starts_hand_computed():
    # size 10, roi 6, overlap 0.5: step 3, windows at 0 and 3, then 6 is clipped back to 4.
    assert window_starts(10, 6, 0.5) == [0, 3, 4]
    assert window_starts(12, 6, 0.5) == [0, 3, 6]
    assert window_starts(12, 6, 0.0) == [0, 6]
    assert window_starts(5, 8, 0.5) == [0]  # shorter than the ROI: one (padded) window
    assert window_starts(9, 4, 0.75) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 6, 1.0)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(11, 9, 14), (5, 8, 6), (8, 8, 8)])
def test_pointwise_predictor_is_reproduced(blend, shape):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 2, *shape, generator=g)
    out = sliding_window_inference(
        pointwise, image, (6, 8, 5), overlap=0.5, sw_batch_size=3, blend=blend
    )
    assert out.shape == (2, 2, *shape)
    torch.testing.assert_close(out, pointwise(image), rtol=1e-5, atol=1e-5)


def test_conv_predictor_on_volume_smaller_than_roi_equals_direct():
    # Zero-padding the volume up to the ROI is what a zero-padded conv does at the border,
    # so a translation-equivariant 3x3x3 conv gives exactly the direct whole-volume result.
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    image = torch.randn(1, 1, 5, 7, 6)
    with torch.no_grad():
        direct = conv(image)
    out = sliding_window_inference(conv, image, 8, overlap=0.5)
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-6)


def test_constant_blend_of_window_coordinates_brute_force():
    # A predictor that returns each voxel's coordinate *inside its window* (not translation
    # equivariant): with constant blending the result is the mean of that coordinate over the
    # windows covering the voxel. Windows along D for size 10, roi 6, overlap 0.5: 0, 3, 4.
    def local_ramp(x):
        d = torch.arange(x.shape[2], dtype=torch.float32).view(1, 1, -1, 1, 1)
        return d.expand(x.shape[0], 1, *x.shape[2:]).clone()

    image = torch.zeros(1, 1, 10, 4, 4)
    out = sliding_window_inference(local_ramp, image, (6, 4, 4), overlap=0.5, blend="constant")
    expected = []
    for z in range(10):
        covering = [z - s for s in (0, 3, 4) if s <= z < s + 6]
        expected.append(sum(covering) / len(covering))
    torch.testing.assert_close(out[0, 0, :, 0, 0], torch.tensor(expected))
    # The same in every (h, w) column.
    torch.testing.assert_close(out, out[:, :, :, :1, :1].expand_as(out))


def test_gaussian_weights_normalise_constant_in_constant_out():
    def const(x):
        return torch.full((x.shape[0], 3, *x.shape[2:]), 2.5)

    image = torch.zeros(1, 1, 23, 17, 30)
    out = sliding_window_inference(const, image, (8, 8, 8), overlap=0.25, blend="gaussian")
    torch.testing.assert_close(out, torch.full_like(out, 2.5), rtol=0, atol=1e-5)


def test_gaussian_map_shape_symmetry_and_floor():
    g = gaussian_importance_map((9, 8, 7))
    assert g.shape == (9, 8, 7)
    assert g.max().item() == pytest.approx(1.0)
    assert g.min().item() >= 1e-3
    torch.testing.assert_close(g, torch.flip(g, (0, 1, 2)))  # centred
    assert g[4, 3, 3] > g[0, 3, 3]  # centre outweighs the edge


def test_sw_batch_size_and_batch_do_not_change_the_result():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Tanh())
    image = torch.randn(2, 2, 13, 10, 9)
    ref = sliding_window_inference(net, image, 6, overlap=0.5, sw_batch_size=1)
    for sw in (2, 5, 100):
        out = sliding_window_inference(net, image, 6, overlap=0.5, sw_batch_size=sw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    single = sliding_window_inference(net, image[1:], 6, overlap=0.5, sw_batch_size=3)
    torch.testing.assert_close(single, ref[1:], rtol=1e-5, atol=1e-6)


def test_a_predictor_returning_a_tuple_is_refused():
    image = torch.randn(1, 2, 6, 6, 6)
    with pytest.raises(TypeError, match="segmenter_of"):
        sliding_window_inference(lambda x: (pointwise(x), torch.zeros(1)), image, 4)


def test_bad_arguments_raise_value_error():
    image = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="blend"):
        sliding_window_inference(pointwise, image, 4, blend="median")
    with pytest.raises(ValueError, match="shape"):
        sliding_window_inference(pointwise, image[0], 4)
    with pytest.raises(ValueError, match="roi_size"):
        sliding_window_inference(pointwise, image, (4, 4))
    with pytest.raises(ValueError, match="predictor returned"):
        sliding_window_inference(lambda x: x[:, :, :2], image, 4)
    with pytest.raises(ValueError, match="tta_axes"):
        predict_volume(pointwise, image, roi_size=4, tta=True, tta_axes=(1,))


def test_covering_roi():
    assert covering_roi((23, 19, 32)) == (32, 32, 32)
    assert covering_roi((240, 240, 155)) == (240, 240, 160)
    assert covering_roi((5, 9), multiple=4) == (8, 12)
    with pytest.raises(ValueError, match="multiple"):
        covering_roi((8, 8, 8), multiple=0)


def test_no_roi_means_one_covering_window():
    image = torch.randn(1, 1, 23, 19, 32)
    seen = []

    def spy(x):
        seen.append(tuple(x.shape[2:]))
        return x * 2

    out = sliding_window_inference(spy, image, None)
    assert seen == [(32, 32, 32)]  # padded to multiples of 16, cropped back
    torch.testing.assert_close(out, image * 2)


def test_flip_combinations():
    assert flip_combinations((2, 3, 4))[0] == ()
    assert len(flip_combinations((2, 3, 4))) == 8
    assert sorted(flip_combinations((2, 4))) == sorted([(), (2,), (4,), (2, 4)])


def test_tta_of_pointwise_function_equals_no_tta():
    # Input is a coordinate ramp (not flip-invariant): only a correct un-flip recovers it.
    d, h, w = 9, 7, 10
    ramp = (
        torch.arange(d).view(d, 1, 1) * 0.3
        - torch.arange(h).view(1, h, 1) * 0.2
        + torch.arange(w).view(1, 1, w) * 0.1
    ).float()
    image = torch.stack([ramp, ramp.flip(0)])[None]  # (1, 2, D, H, W)
    plain = predict_volume(pointwise, image, roi_size=(6, 5, 8), overlap=0.5)
    tta = predict_volume(pointwise, image, roi_size=(6, 5, 8), overlap=0.5, tta=True)
    torch.testing.assert_close(plain, torch.sigmoid(pointwise(image)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-6)


def test_tta_unflips_the_prediction_not_the_input():
    # A predictor that ignores its input and returns a ramp along D. Correct TTA averages the
    # ramp with its mirror; flipping the input back before predicting (the original code's bug)
    # would leave the ramp unchanged.
    def d_ramp(x):
        r = torch.linspace(-1.0, 3.0, x.shape[2]).view(1, 1, -1, 1, 1)
        return r.expand(x.shape[0], 1, *x.shape[2:]).clone()

    image = torch.zeros(1, 1, 8, 4, 4)
    p = torch.sigmoid(torch.linspace(-1.0, 3.0, 8))
    expected = (p + p.flip(0)) / 2
    for axes in [(2,), (2, 3, 4)]:
        out = predict_volume(d_ramp, image, roi_size=(8, 4, 4), tta=True, tta_axes=axes)
        torch.testing.assert_close(out[0, 0, :, 1, 2], expected)
    plain = predict_volume(d_ramp, image, roi_size=(8, 4, 4))
    torch.testing.assert_close(plain[0, 0, :, 0, 0], p)
    # Flips along the other axes only leave a D ramp untouched.
    only_hw = predict_volume(d_ramp, image, roi_size=(8, 4, 4), tta=True, tta_axes=(3, 4))
    torch.testing.assert_close(only_hw, plain)


def test_autocast_bf16_runs_and_stays_float32():
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    image = torch.randn(1, 1, 6, 6, 6)
    out = predict_volume(conv, image, roi_size=4, autocast_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    ref = predict_volume(conv, image, roi_size=4)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2)

import itertools
import math

import pytest
import torch
from torch import nn

from nnunetv2_macl.data.augmentation import (
    RandomIntensityTransform,
    RandomSpatialTransform,
    downsample,
    make_spatial_transform,
)

SHAPES = {2: (3, 2, 16, 12), 3: (2, 2, 8, 10, 6)}


def _identity_transform(**kw):
    args = dict(rotation_degrees=0.0, scale_range=(1.0, 1.0), translation=0.0, mirror_probability=0.0)
    args.update(kw)
    return RandomSpatialTransform(**args)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ spatial
@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_when_degenerate(ndim):
    x = torch.randn(SHAPES[ndim], generator=_gen(1))
    t = _identity_transform()
    theta = t.sample_matrices(x.shape[0], ndim, "cpu", generator=_gen())
    eye = torch.eye(ndim, ndim + 1).expand(x.shape[0], -1, -1)
    torch.testing.assert_close(theta, eye)
    torch.testing.assert_close(t(x, generator=_gen()), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(t(x), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_mirror_prob_one_flips_exactly(ndim):
    x = torch.randn(SHAPES[ndim], generator=_gen(2))
    for axis in range(ndim):
        t = _identity_transform(mirror_axes=(axis,), mirror_probability=1.0)
        torch.testing.assert_close(t(x, generator=_gen()), torch.flip(x, dims=(axis + 2,)), atol=1e-5, rtol=0)
    t = _identity_transform(mirror_axes=None, mirror_probability=1.0)
    all_axes = tuple(range(2, ndim + 2))
    torch.testing.assert_close(t(x, generator=_gen()), torch.flip(x, dims=all_axes), atol=1e-5, rtol=0)
    # empty axes: never mirrors
    t = _identity_transform(mirror_axes=(), mirror_probability=1.0)
    torch.testing.assert_close(t(x), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim,size", [(2, (16, 8)), (3, (4, 16, 8))])
def test_rotation_is_rigid_in_pixel_space_for_non_square(ndim, size):
    # theta acts on normalised coords; mapped back to pixel units (grid order = reversed
    # tensor order, half extents h) the linear part must be orthonormal (a rigid rotation).
    t = RandomSpatialTransform(rotation_degrees=40.0, scale_range=(1, 1), translation=0.0, mirror_probability=0.0)
    theta = t.sample_matrices(8, ndim, "cpu", generator=_gen(), spatial_size=size)
    h = torch.tensor(size[::-1], dtype=torch.float32) / 2
    a_pix = h[None, :, None] * theta[:, :, :ndim] / h[None, None, :]
    eye = torch.eye(ndim).expand(8, -1, -1)
    torch.testing.assert_close(a_pix @ a_pix.transpose(1, 2), eye, atol=1e-5, rtol=0)
    assert not torch.allclose(a_pix, eye, atol=1e-2)
    # and forward uses the aspect-corrected matrices
    x = torch.randn((8, 1) + size, generator=_gen(1))
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    ref = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    torch.testing.assert_close(t(x, generator=_gen()), ref)
    # without spatial_size the identity still comes out for degenerate settings
    t0 = _identity_transform()
    torch.testing.assert_close(t0.sample_matrices(1, ndim, "cpu", spatial_size=size), torch.eye(ndim, ndim + 1)[None])


@pytest.mark.parametrize("ndim", [2, 3])
def test_per_sample_independence(ndim):
    n = 6
    shape = (n,) + SHAPES[ndim][1:]
    x = torch.randn((1,) + shape[1:], generator=_gen(3)).expand(shape).contiguous()
    t = RandomSpatialTransform()
    theta = t.sample_matrices(n, ndim, "cpu", generator=_gen(4))
    assert theta.shape == (n, ndim, ndim + 1)
    flat = theta.flatten(1)
    for i in range(n):
        for j in range(i + 1, n):
            assert not torch.allclose(flat[i], flat[j])
    y = t(x, generator=_gen(4))
    for i in range(n):
        for j in range(i + 1, n):
            assert not torch.allclose(y[i], y[j])


@pytest.mark.parametrize("ndim", [2, 3])
def test_same_seed_same_output(ndim):
    x = torch.randn(SHAPES[ndim], generator=_gen(5))
    t = RandomSpatialTransform()
    a = t(x, generator=_gen(123))
    b = t(x, generator=_gen(123))
    c = t(x, generator=_gen(124))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    torch.manual_seed(7)
    d = t(x)
    torch.manual_seed(7)
    e = t(x)
    torch.testing.assert_close(d, e, atol=0, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shape_dtype_device_preserved(ndim, dtype):
    x = torch.randn(SHAPES[ndim]).to(dtype)
    for t in (RandomSpatialTransform(), RandomIntensityTransform(p=1.0), make_spatial_transform("fix")):
        y = t(x, generator=_gen())
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device


def test_bf16_close_to_float32():
    x = torch.rand(SHAPES[2])
    t = RandomSpatialTransform()
    y32 = t(x, generator=_gen(9))
    y16 = t(x.bfloat16(), generator=_gen(9))
    torch.testing.assert_close(y16.float(), y32, atol=2e-2, rtol=2e-2)


def test_scale_and_translation_direction():
    # zoom factor s > 1 enlarges content: a centred blob gets wider
    x = torch.zeros(1, 1, 33, 33)
    x[..., 12:21, 12:21] = 1.0
    zoom = RandomSpatialTransform(rotation_degrees=0, scale_range=(2.0, 2.0), translation=0, mirror_probability=0)
    assert zoom(x).gt(0.5).sum() > x.gt(0.5).sum() * 3
    shrink = RandomSpatialTransform(rotation_degrees=0, scale_range=(0.5, 0.5), translation=0, mirror_probability=0)
    assert shrink(x).gt(0.5).sum() < x.gt(0.5).sum()


def test_p_rotation_p_scale_zero():
    t = RandomSpatialTransform(rotation_degrees=30, scale_range=(0.7, 1.3), translation=0, mirror_probability=0,
                               p_rotation=0.0, p_scale=0.0)
    theta = t.sample_matrices(5, 3, "cpu", generator=_gen())
    torch.testing.assert_close(theta, torch.eye(3, 4).expand(5, -1, -1))


def test_rotation_matrices_orthonormal_3d():
    t = RandomSpatialTransform(rotation_degrees=45, scale_range=(1, 1), translation=0, mirror_probability=0.5)
    a = t.sample_matrices(8, 3, "cpu", generator=_gen())[:, :, :3]
    torch.testing.assert_close(a @ a.transpose(1, 2), torch.eye(3).expand(8, -1, -1), atol=1e-5, rtol=0)
    # rotations about all three axes: off-diagonal entries everywhere
    assert (a.abs() > 1e-3).sum(0).min() > 0


def test_make_spatial_transform():
    fix = make_spatial_transform("fix")
    assert isinstance(fix, nn.Identity)
    x = torch.randn(2, 1, 8, 8)
    assert fix(x) is x and fix(x, generator=_gen()) is x
    var = make_spatial_transform("var", rotation_degrees=5.0)
    assert isinstance(var, RandomSpatialTransform) and var.rotation_degrees == 5.0
    assert isinstance(make_spatial_transform(), RandomSpatialTransform)
    with pytest.raises(ValueError):
        make_spatial_transform("foo")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rotation_degrees=-1.0),
        dict(rotation_degrees=float("nan")),
        dict(scale_range=(0.0, 1.0)),
        dict(scale_range=(1.3, 0.7)),
        dict(scale_range=(1.0,)),
        dict(translation=-0.1),
        dict(mirror_axes=(0, 0)),
        dict(mirror_axes=(3,)),
        dict(mirror_axes=(-1,)),
        dict(mirror_probability=1.5),
        dict(p_rotation=-0.1),
        dict(p_scale=2.0),
    ],
)
def test_invalid_spatial_args(kwargs):
    with pytest.raises(ValueError):
        RandomSpatialTransform(**kwargs)


def test_invalid_spatial_inputs():
    t = RandomSpatialTransform()
    with pytest.raises(ValueError):
        t(torch.randn(2, 8, 8))
    with pytest.raises(ValueError):
        t(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError):
        t.sample_matrices(2, 4, "cpu")
    with pytest.raises(ValueError):
        t.sample_matrices(-1, 2, "cpu")
    with pytest.raises(ValueError):
        RandomSpatialTransform(mirror_axes=(2,))(torch.randn(1, 1, 8, 8))  # axis 2 needs 3-D
    with pytest.raises(ValueError):
        RandomIntensityTransform(p=-0.5)
    with pytest.raises(ValueError):
        RandomIntensityTransform(p=1.5)


def test_empty_batch():
    x = torch.randn(0, 1, 8, 8)
    assert RandomSpatialTransform()(x).shape == x.shape
    assert RandomIntensityTransform(1.0)(x).shape == x.shape


# ------------------------------------------------------------------ downsample
def test_downsample_sizes():
    assert downsample(torch.randn(2, 3, 64, 48), (0.25, 0.25)).shape == (2, 3, 16, 12)
    assert downsample(torch.randn(2, 3, 64, 48), 0.5).shape == (2, 3, 32, 24)
    assert downsample(torch.randn(1, 1, 16, 32, 40), (0.5, 0.25, 0.125)).shape == (1, 1, 8, 8, 5)
    # like a stride-k convolution with centred padding: ceil(n / k)
    assert downsample(torch.randn(1, 1, 10, 9), (0.25, 1.0)).shape == (1, 1, 3, 9)


def test_downsample_identity_returns_x():
    x = torch.randn(2, 1, 8, 8)
    assert downsample(x, (1.0, 1.0)) is x
    y = torch.randn(1, 1, 4, 8, 8)
    assert downsample(y, (1, 1, 1)) is y


@pytest.mark.parametrize("shape,scale", [((2, 2, 64, 48), (0.25, 0.25)), ((1, 1, 16, 16, 16), (0.5, 0.25, 0.125))])
def test_downsample_constant_stays_constant(shape, scale):
    x = torch.full(shape, 3.7)
    y = downsample(x, scale)
    torch.testing.assert_close(y, torch.full_like(y, 3.7))


def _centred_window(n: int, k: int, i: int) -> range:
    """The input pixels output pixel i averages: a window centred on k*i, k+1 wide for even k (k for
    odd k), clipped to the input (METHOD.md: cell j of a stride-T map sits on pixel T*j)."""
    half = (k + 1 if k % 2 == 0 else k) // 2 if k > 1 else 0
    return range(max(0, k * i - half), min(n, k * i + half + 1))


@pytest.mark.parametrize("shape,scale", [((2, 3, 16, 12), (0.25, 0.25)), ((1, 2, 4, 8, 12), (0.5, 0.25, 1.0 / 3))])
def test_downsample_averages_a_window_centred_on_every_kth_pixel(shape, scale):
    """Written out pixel by pixel: output i stands for input k*i, where nnU-Net's stride-k grids put
    their cell i (a k x k block average would stand for k*i + (k-1)/2)."""
    x = torch.randn(shape, dtype=torch.float64)
    y = downsample(x, scale)
    k = [int(round(1 / s)) for s in scale]
    for index in itertools.product(*[range(n) for n in y.shape[2:]]):
        windows = [list(_centred_window(n, f, i)) for n, f, i in zip(x.shape[2:], k, index)]
        expected = x[(slice(None), slice(None)) + tuple(slice(w[0], w[-1] + 1) for w in windows)]
        expected = expected.flatten(2).mean(dim=2)
        torch.testing.assert_close(y[(slice(None), slice(None)) + index], expected)


def test_downsample_of_an_impulse_is_centred():
    """An impulse on pixel k*i lands on output i alone, symmetric around it: a block average would
    put pixel k*i into output i together with the k-1 pixels to its right only."""
    x = torch.zeros(1, 1, 17, 17)
    x[0, 0, 8, 8] = 1.0
    y = downsample(x, 0.25)
    assert y[0, 0].argmax().item() == 2 * 5 + 2  # (8 / 4, 8 / 4) on the 5 x 5 output
    assert torch.count_nonzero(y).item() == 1


def test_downsample_dtype_and_grad():
    x = torch.randn(1, 2, 16, 16, dtype=torch.bfloat16)
    y = downsample(x, (0.5, 0.5))
    assert y.dtype == torch.bfloat16 and y.shape == (1, 2, 8, 8)
    z = torch.randn(1, 2, 16, 16, requires_grad=True)
    downsample(z, (0.25, 0.25)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    "x,scale",
    [
        (torch.randn(1, 1, 8, 8), (0.3, 0.5)),  # not 1/k for an integer k
        (torch.randn(1, 1, 8, 8), (2.0, 0.5)),  # up-sampling
        (torch.randn(1, 1, 8, 8), (0.5,)),  # wrong number of factors
        (torch.randn(1, 1, 8, 8), (0.0, 0.5)),
        (torch.randn(1, 1, 8, 8), (-0.5, 0.5)),
        (torch.randn(1, 1, 8, 8), (math.inf, 0.5)),
        (torch.randn(8, 8), (0.5, 0.5)),  # wrong rank
    ],
)
def test_downsample_invalid(x, scale):
    with pytest.raises(ValueError):
        downsample(x, scale)


# ------------------------------------------------------------------ intensity
@pytest.mark.parametrize("ndim", [2, 3])
def test_intensity_p0_identity(ndim):
    x = torch.randn(SHAPES[ndim])
    y = RandomIntensityTransform(p=0.0)(x, generator=_gen())
    torch.testing.assert_close(y, x, atol=0, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_intensity_p1_changes_and_is_deterministic(ndim):
    x = torch.rand(SHAPES[ndim]) + 0.5
    t = RandomIntensityTransform(p=1.0)
    y = t(x, generator=_gen(11))
    assert not torch.allclose(y, x)
    assert torch.isfinite(y).all()
    # every sample changed
    assert ((y - x).flatten(1).abs().amax(1) > 1e-4).all()
    torch.testing.assert_close(t(x, generator=_gen(11)), y, atol=0, rtol=0)
    assert not torch.allclose(t(x, generator=_gen(12)), y)


def test_intensity_per_sample_and_partial():
    n = 64
    x = (torch.rand(1, 1, 8, 8) + 0.5).expand(n, 1, 8, 8).contiguous()
    y = RandomIntensityTransform(p=1.0)(x, generator=_gen(0))
    flat = y.flatten(1)
    assert not torch.allclose(flat[0], flat[1])
    # with p = 0.15 some samples (prob 0.85^4 each) stay bit-identical, some change
    y = RandomIntensityTransform(p=0.15)(x, generator=_gen(0))
    same = (y == x).flatten(1).all(1)
    assert same.any() and (~same).any()


def test_intensity_constant_image_finite():
    x = torch.full((2, 1, 8, 8), 2.0)
    y = RandomIntensityTransform(p=1.0)(x, generator=_gen(0))
    assert torch.isfinite(y).all()

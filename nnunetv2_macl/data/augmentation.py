"""Batched, device-side augmentation for MACL pretraining (2-D and 3-D).

Everything here works on whole batches with tensor ops (``affine_grid`` /
``grid_sample`` / broadcasting); there is no Python loop over samples.

* :func:`downsample` -- the paper's ``down()``: an average centred on every k-th pixel, which keeps
  the geometry of nnU-Net's strided grids (cell j of stride T on pixel T*j; METHOD.md).
* :class:`RandomSpatialTransform` -- ``T_var``: random rotation, isotropic
  scale, translation and mirroring, drawn independently per sample and applied
  to the whole batch with a single ``grid_sample`` call.
* :class:`RandomIntensityTransform` -- optional per-sample intensity jitter
  (brightness, contrast, gamma, gaussian noise).
* :func:`make_spatial_transform` -- ``"fix"`` (``T_fix``, the identity) or
  ``"var"`` (``T_var``).

Randomness and determinism
--------------------------
All ``forward`` / ``sample_matrices`` methods accept an optional
``torch.Generator``. The small per-sample parameter tensors (angles, scales,
shifts, mirror flags, intensity factors, ...) are drawn on the generator's
device -- i.e. on the CPU for an ordinary ``torch.Generator()`` -- and then moved
to ``x.device``. Without a generator they are drawn from the global CPU RNG
(so ``torch.manual_seed`` makes them reproducible independently of the device
the batch lives on). The only large random tensor, the gaussian-noise field of
:class:`RandomIntensityTransform`, is drawn on the generator's device when a
generator is given (then moved to ``x.device``) and directly on ``x.device``
(global RNG of that device) otherwise. Consequently the same generator seed
gives the same output for the same input.

Coordinate conventions
----------------------
Spatial axes are numbered in tensor order: for ``(N, C, H, W)`` axis 0 is H and
axis 1 is W; for ``(N, C, D, H, W)`` axis 0 is D, 1 is H, 2 is W (as nnU-Net's
``mirror_axes``). The matrices returned by
:meth:`RandomSpatialTransform.sample_matrices` follow ``F.affine_grid``: they
map *output* normalised coordinates ``(x, y[, z])`` (i.e. W, H[, D] -- reversed
tensor order) to *input* normalised coordinates.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "downsample",
    "centred_pool",
    "integer_factors",
    "RandomSpatialTransform",
    "RandomIntensityTransform",
    "IdentityTransform",
    "make_spatial_transform",
]


# --------------------------------------------------------------------------- helpers
def _check_batch(x: Tensor, name: str = "x") -> int:
    """Return the number of spatial dims of a (N,C,H,W) / (N,C,D,H,W) batch."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(
            f"{name} must be a 4-D (N,C,H,W) or 5-D (N,C,D,H,W) tensor, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating point dtype, got {x.dtype}")
    return x.dim() - 2


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision / float32 inputs, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rng_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def _uniform(shape, low: float, high: float, generator, device) -> Tensor:
    """U(low, high) drawn on the generator's device (CPU by default), moved to ``device``."""
    u = torch.rand(shape, generator=generator, device=_rng_device(generator), dtype=torch.float32)
    return (low + (high - low) * u).to(device)


def _bernoulli(shape, p: float, generator, device) -> Tensor:
    """Boolean mask with P(True) = p, drawn like :func:`_uniform`."""
    u = torch.rand(shape, generator=generator, device=_rng_device(generator), dtype=torch.float32)
    return (u < p).to(device)


def _check_probability(value, name: str) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- down()
def integer_factors(scale: Sequence[float] | float, ndim: int) -> list[int]:
    """The integer down-sampling factor k = 1/scale of every spatial axis (MACL's lambda is 1/k with k a
    product of strides). Raises ValueError for a factor that is not the inverse of a positive integer."""
    if isinstance(scale, Real) and not isinstance(scale, bool):
        scales = [float(scale)] * ndim
    else:
        try:
            scales = [float(s) for s in scale]
        except TypeError as e:
            raise ValueError(f"scale must be a number or a sequence of numbers, got {scale!r}") from e
    if len(scales) != ndim:
        raise ValueError(f"scale needs {ndim} factors for a {ndim}-D batch, got {len(scales)}")
    if any(not math.isfinite(s) or s <= 0 or s > 1 for s in scales):
        raise ValueError(f"scale factors must be finite and in (0, 1], got {scales}")
    factors = [int(round(1.0 / s)) for s in scales]
    if any(abs(1.0 / s - k) > 1e-6 * k for s, k in zip(scales, factors)):
        raise ValueError(f"scale factors must be 1/k for integers k (MACL's lambda), got {scales}")
    return factors


def centred_pool(x: Tensor, factors: Sequence[int]) -> Tensor:
    """Average over a window centred on every k-th element, starting at 0: output i stands for input k*i.

    nnU-Net's down-sampling stages are 3x3 convolutions with padding 1 and stride 2, so cell j of a map
    of total stride T sits on input pixel T*j (METHOD.md, geometry). A k x k block average would sit on
    k*i + (k-1)/2 instead. The window is k+1 wide for even k (k for odd k), symmetric about k*i; at the
    border only the pixels inside the input are averaged. Output size: ceil(n / k) per axis.
    """
    ndim = x.ndim - 2
    kernel = [k + 1 if k % 2 == 0 else k for k in factors]
    kernel = [1 if k == 1 else w for k, w in zip(factors, kernel)]
    padding = [w // 2 for w in kernel]
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    # explicit zero padding and a pooled mask of the real pixels instead of the pool's own padding: torch's
    # pools refuse inputs smaller than the kernel (a 4-voxel axis with k = 4), which the centred window allows
    pads = [p for w in reversed(padding) for p in (w, w)]
    inside = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), pads)
    total = pool(F.pad(x, pads), kernel_size=kernel, stride=list(factors))
    return total / pool(inside, kernel_size=kernel, stride=list(factors))


def downsample(x: Tensor, scale: Sequence[float] | float) -> Tensor:
    """The paper's ``down()``: shrink the spatial axes of ``x`` by integer factors k = 1/scale.

    Output pixel i is the average of a window centred on input pixel k*i (:func:`centred_pool`), so that
    the dominant branch's grids sit on the same input pixels as nnU-Net's strided feature maps of the
    full-resolution input: the dominant bottleneck cell j on pixel k*T*j, the auxiliary one k*j on the
    same pixel. The output size is ceil(size / k) per axis. ``scale`` is one factor per spatial axis
    (a single number is broadcast). When every k is 1, ``x`` itself is returned. Half-precision inputs
    on the CPU are pooled in float32 and cast back. Differentiable with respect to ``x``.

    Raises:
        ValueError: wrong input rank/dtype, wrong number of factors, or a factor that is not 1/k for a
            positive integer k.
    """
    ndim = _check_batch(x)
    factors = integer_factors(scale, ndim)
    if all(k == 1 for k in factors):
        return x
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return centred_pool(x.float(), factors).to(x.dtype)
    return centred_pool(x, factors)


# --------------------------------------------------------------------------- T_var
def _rotation_matrices(angles: Tensor) -> Tensor:
    """Rotation matrices for per-sample angles (radians).

    angles: (N,) for 2-D or (N, 3) for 3-D (rotations about x, y, z applied in
    that order, i.e. R = Rz @ Ry @ Rx). Returns (N, ndim, ndim) in (x, y[, z]) order.
    """
    if angles.dim() == 1:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    n = angles.shape[0]
    cos, sin = torch.cos(angles), torch.sin(angles)
    one = torch.ones(n, dtype=angles.dtype, device=angles.device)
    zero = torch.zeros_like(one)

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    cx, cy, cz = cos.unbind(-1)
    sx, sy, sz = sin.unbind(-1)
    rx = mat([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = mat([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    return rz @ ry @ rx


class RandomSpatialTransform(nn.Module):
    """``T_var``: random rotation, isotropic scale, translation and mirroring.

    Parameters are drawn independently per sample and the whole batch is warped
    with one ``F.grid_sample`` call (bilinear, ``padding_mode="zeros"``,
    ``align_corners=False``), computed in float32 (float64 for float64 input) and
    cast back to the input dtype. All channels of a sample share its transform.

    Args:
        rotation_degrees: angles are drawn from U(-r, r) degrees; in 3-D one angle
            about each of the three axes.
        scale_range: isotropic zoom factor s ~ U(lo, hi); s > 1 enlarges the
            content (sampling coordinates are multiplied by 1/s).
        translation: shift per axis ~ U(-t, t) as a fraction of that axis' extent.
        mirror_axes: spatial axes (tensor order, see module doc) that may be
            mirrored; ``None`` = all spatial axes; ``()`` = no mirroring.
        mirror_probability: per-sample, per-axis probability of mirroring.
        p_rotation: per-sample probability of applying a rotation.
        p_scale: per-sample probability of applying a scaling.

    Rotations are done in pixel (voxel) space, i.e. they are rigid for
    non-square images (the aspect ratio of the batch is accounted for).
    """

    def __init__(
        self,
        rotation_degrees: float = 15.0,
        scale_range: tuple[float, float] = (0.7, 1.3),
        translation: float = 0.1,
        mirror_axes: Sequence[int] | None = None,
        mirror_probability: float = 0.5,
        p_rotation: float = 1.0,
        p_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if (
            not isinstance(rotation_degrees, Real)
            or isinstance(rotation_degrees, bool)
            or not math.isfinite(rotation_degrees)
            or rotation_degrees < 0
        ):
            raise ValueError(f"rotation_degrees must be a finite number >= 0, got {rotation_degrees!r}")
        try:
            lo, hi = (float(v) for v in scale_range)
        except (TypeError, ValueError) as e:
            raise ValueError(f"scale_range must be a pair (low, high), got {scale_range!r}") from e
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"scale_range must satisfy 0 < low <= high (finite), got {scale_range!r}")
        if (
            not isinstance(translation, Real)
            or isinstance(translation, bool)
            or not math.isfinite(translation)
            or translation < 0
        ):
            raise ValueError(f"translation must be a finite number >= 0, got {translation!r}")
        if mirror_axes is not None:
            try:
                axes = tuple(mirror_axes)
            except TypeError as e:
                raise ValueError(f"mirror_axes must be a sequence of ints or None, got {mirror_axes!r}") from e
            for a in axes:
                if isinstance(a, bool) or not isinstance(a, int) or not (0 <= a <= 2):
                    raise ValueError(f"mirror_axes entries must be ints in [0, 2], got {mirror_axes!r}")
            if len(set(axes)) != len(axes):
                raise ValueError(f"mirror_axes contains duplicates: {mirror_axes!r}")
            mirror_axes = axes
        self.rotation_degrees = float(rotation_degrees)
        self.scale_range = (lo, hi)
        self.translation = float(translation)
        self.mirror_axes = mirror_axes
        self.mirror_probability = _check_probability(mirror_probability, "mirror_probability")
        self.p_rotation = _check_probability(p_rotation, "p_rotation")
        self.p_scale = _check_probability(p_scale, "p_scale")

    def extra_repr(self) -> str:
        return (
            f"rotation_degrees={self.rotation_degrees}, scale_range={self.scale_range}, "
            f"translation={self.translation}, mirror_axes={self.mirror_axes}, "
            f"mirror_probability={self.mirror_probability}, p_rotation={self.p_rotation}, "
            f"p_scale={self.p_scale}"
        )

    def _mirror_axes_for(self, ndim: int) -> tuple[int, ...]:
        if self.mirror_axes is None:
            return tuple(range(ndim))
        bad = [a for a in self.mirror_axes if a >= ndim]
        if bad:
            raise ValueError(f"mirror_axes {self.mirror_axes} invalid for a {ndim}-D batch")
        return tuple(self.mirror_axes)

    def sample_matrices(
        self,
        batch_size: int,
        ndim: int,
        device=None,
        generator: torch.Generator | None = None,
        spatial_size: Sequence[int] | None = None,
    ) -> Tensor:
        """Draw per-sample affine matrices ``theta`` of shape (N, ndim, ndim+1), float32.

        ``theta`` is in ``F.affine_grid`` convention (output -> input normalised
        coordinates, ``align_corners=False``). ``spatial_size`` (tensor order,
        optional, extension of the documented API) makes the rotation rigid in
        pixel space for non-square images; without it the rotation acts on
        normalised coordinates (exactly rigid only for square/cubic inputs).
        Random numbers are drawn on the generator's device (CPU by default) and
        the result is moved to ``device``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
        mirror_axes = self._mirror_axes_for(ndim)
        device = torch.device("cpu") if device is None else torch.device(device)
        n = batch_size
        rdev = _rng_device(generator)  # build on the RNG device, move once at the end

        # rotation (x, y[, z] order); a fixed draw order keeps seeds reproducible
        n_angles = 1 if ndim == 2 else 3
        max_rad = math.radians(self.rotation_degrees)
        angles = _uniform((n, n_angles), -max_rad, max_rad, generator, rdev)
        angles = angles * _bernoulli((n, 1), self.p_rotation, generator, rdev)
        rot = _rotation_matrices(angles[:, 0] if ndim == 2 else angles)  # (N, ndim, ndim)

        # isotropic scale: sampling coordinates are divided by s (s > 1 zooms in)
        lo, hi = self.scale_range
        s = _uniform((n,), lo, hi, generator, rdev)
        s = torch.where(_bernoulli((n,), self.p_scale, generator, rdev), s, torch.ones_like(s))

        # translation as a fraction of the extent -> normalised units span 2
        shift = 2.0 * _uniform((n, ndim), -self.translation, self.translation, generator, rdev)

        # mirroring: tensor axis a <-> grid coordinate index ndim - 1 - a
        flip_draw = _bernoulli((n, ndim), self.mirror_probability, generator, rdev)
        allowed = torch.zeros(ndim, dtype=torch.bool, device=rdev)
        for a in mirror_axes:
            allowed[ndim - 1 - a] = True
        signs = torch.where(flip_draw & allowed, -1.0, 1.0)  # (N, ndim) in grid order

        a_pix = rot / s[:, None, None] * signs[:, None, :]  # R @ diag(signs) / s
        if spatial_size is not None:
            size = [float(v) for v in spatial_size]
            if len(size) != ndim or any(v <= 0 for v in size):
                raise ValueError(f"spatial_size must hold {ndim} positive sizes, got {spatial_size!r}")
            half = torch.tensor(size[::-1], dtype=torch.float32, device=rdev)  # grid order
            # in_norm = diag(1/h) A_pix diag(h) out_norm  (h = half extent, align_corners=False)
            a_pix = a_pix * (half[None, None, :] / half[None, :, None])
        theta = torch.cat([a_pix, shift[:, :, None]], dim=2)
        return theta.to(device=device, dtype=torch.float32)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        ndim = _check_batch(x)
        if x.shape[0] == 0:
            return x
        theta = self.sample_matrices(
            x.shape[0], ndim, x.device, generator=generator, spatial_size=tuple(x.shape[2:])
        )
        cdtype = _compute_dtype(x.dtype)
        xc = x.to(cdtype)
        grid = F.affine_grid(theta.to(cdtype), list(xc.shape), align_corners=False)
        out = F.grid_sample(xc, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.to(x.dtype)


# --------------------------------------------------------------------------- intensity
class RandomIntensityTransform(nn.Module):
    """Per-sample intensity jitter, each op applied to a sample with probability ``p``.

    In this order: brightness (x * U(0.75, 1.25)), contrast (per channel, about
    the channel mean, factor U(0.75, 1.25)), gamma (per channel on min-max
    normalised values, gamma from U(0.7, 1) or U(1, 1.5) with equal chance as in
    nnU-Net; intensity range restored afterwards) and additive gaussian noise
    (std ~ U(0, 0.1), same std for all channels of a sample). Computed in float32
    (float64 for float64 input) and cast back; samples an op is not applied to
    are left bit-identical for that op. ``p == 0`` returns ``x`` itself.
    """

    def __init__(self, p: float = 0.15) -> None:
        super().__init__()
        self.p = _check_probability(p, "p")
        self.brightness_range = (0.75, 1.25)
        self.contrast_range = (0.75, 1.25)
        self.gamma_range = (0.7, 1.5)
        self.noise_std_range = (0.0, 0.1)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        ndim = _check_batch(x)
        n = x.shape[0]
        if self.p == 0.0 or n == 0:
            return x
        dev = x.device
        cdtype = _compute_dtype(x.dtype)
        bshape = (n,) + (1,) * (ndim + 1)  # broadcast over C and spatial dims
        sdims = tuple(range(2, ndim + 2))
        g = generator

        # all per-sample parameters first (fixed draw order)
        m_bright = _bernoulli((n,), self.p, g, dev).view(bshape)
        f_bright = _uniform((n,), *self.brightness_range, g, dev).to(cdtype).view(bshape)
        m_contr = _bernoulli((n,), self.p, g, dev).view(bshape)
        f_contr = _uniform((n,), *self.contrast_range, g, dev).to(cdtype).view(bshape)
        m_gamma = _bernoulli((n,), self.p, g, dev).view(bshape)
        g_low = _bernoulli((n,), 0.5, g, dev)
        g_lo_val = _uniform((n,), self.gamma_range[0], 1.0, g, dev)
        g_hi_val = _uniform((n,), 1.0, self.gamma_range[1], g, dev)
        gamma = torch.where(g_low, g_lo_val, g_hi_val).to(cdtype).view(bshape)
        m_noise_cpu = _bernoulli((n,), self.p, g, _rng_device(g))
        std = _uniform((n,), *self.noise_std_range, g, dev).to(cdtype).view(bshape)

        out = x.to(cdtype)
        out = torch.where(m_bright, out * f_bright, out)

        mean = out.mean(dim=sdims, keepdim=True)
        out = torch.where(m_contr, (out - mean) * f_contr + mean, out)

        mn = out.amin(dim=sdims, keepdim=True)
        rng = out.amax(dim=sdims, keepdim=True) - mn
        eps = torch.finfo(cdtype).eps
        normed = ((out - mn) / rng.clamp_min(eps)).clamp(0.0, 1.0)
        out = torch.where(m_gamma, normed.pow(gamma) * rng + mn, out)

        if bool(m_noise_cpu.any()):  # mask lives on the RNG device: no device sync
            if g is None:
                noise = torch.randn(out.shape, device=dev, dtype=cdtype)
            else:
                noise = torch.randn(out.shape, generator=g, device=g.device, dtype=cdtype).to(dev)
            m_noise = m_noise_cpu.to(dev).view(bshape)
            out = torch.where(m_noise, out + noise * std, out)
        return out.to(x.dtype)


# --------------------------------------------------------------------------- factory
class IdentityTransform(nn.Identity):
    """``T_fix``: the identity; accepts (and ignores) a ``generator`` like the random transforms."""

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:  # noqa: ARG002
        return x


def make_spatial_transform(kind: str = "var", **kwargs) -> nn.Module:
    """``"fix"`` -> identity (paper's ``T_fix``; kwargs are ignored), ``"var"`` ->
    :class:`RandomSpatialTransform` (``**kwargs``). The identity is an
    ``nn.Identity`` subclass whose ``forward`` also accepts ``generator=``."""
    if not isinstance(kind, str):
        raise ValueError(f"kind must be 'fix' or 'var', got {kind!r}")
    k = kind.strip().lower()
    if k == "fix":
        return IdentityTransform()
    if k == "var":
        return RandomSpatialTransform(**kwargs)
    raise ValueError(f"kind must be 'fix' or 'var', got {kind!r}")

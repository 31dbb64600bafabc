"""Supervised-contrastive (SupCon) loss with position-based positives.

Reference:
    - MACL: Zeng et al., "Multi-level Asymmetric Contrastive Learning for Volumetric Medical
      Image Segmentation Pre-training", eq. 11 (image level) and eq. 12 (pixel level).
    - PCL: Zeng et al., "Positional Contrastive Learning for Volumetric Medical Image
      Segmentation", MICCAI 2021 (position-based positives).
    - SupCon: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.

Exact definition (see METHOD.md, "Losses"): for features f (L2-normalised) and a positive
mask P,

    loss_a = -1/|P(a)| * sum_{b in P(a)} log( exp(f_a.f_b / tau) / sum_{k != a} exp(f_a.f_k / tau) )

averaged over the anchors that have at least one positive.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Positions are rationals such as (i + 1) / n_slices, so |p_a - p_b| == t happens in practice
# and float rounding would make the strict "<" flip at random. Differences within this
# tolerance of the threshold count as ties, i.e. NOT positive.
_TIE_TOLERANCE = 1e-6

POSITIVE_MODES = ("position", "instance")


@contextlib.contextmanager
def float32_math(device: torch.device) -> Iterator[None]:
    """Disables autocast so that casts to float32 inside the losses stay float32."""
    is_available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if is_available is not None and not is_available(device.type):
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _finite_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        result = float(value)  # accepts python, numpy and 0-d tensor numbers
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def check_threshold(threshold: float) -> None:
    value = _finite_float(threshold)
    if value is None or not 0.0 < value <= 1.0:
        raise ValueError(
            f"threshold must be a number in (0, 1] (positions are normalised to [0, 1]), got {threshold!r}"
        )


def check_tau(tau: float, base_temperature: float | None = None) -> None:
    value = _finite_float(tau)
    if value is None or value <= 0:
        raise ValueError(f"temperature tau must be a finite number > 0, got {tau!r}")
    if base_temperature is not None:
        base = _finite_float(base_temperature)
        if base is None or base <= 0:
            raise ValueError(f"base_temperature must be None or a finite number > 0, got {base_temperature!r}")


def check_positives(positives: str) -> None:
    if positives not in POSITIVE_MODES:
        raise ValueError(f"positives must be one of {POSITIVE_MODES}, got {positives!r}")


def position_positive_mask(positions: Tensor, threshold: float) -> Tensor:
    """Positive pairs from normalised positions (PCL).

    Args:
        positions: (M,) or (M, D) positions in [0, 1] (D axes, e.g. a 3-D patch centre).
        threshold: t in (0, 1]. a and b are positives when |p_a - p_b| < t on every axis.
            |p_a - p_b| == t (up to 1e-6 float rounding) is NOT positive.

    Returns:
        (M, M) bool mask, diagonal False.
    """
    check_threshold(threshold)
    if not isinstance(positions, Tensor):
        raise ValueError(f"positions must be a tensor, got {type(positions).__name__}")
    if positions.ndim not in (1, 2):
        raise ValueError(f"positions must have shape (M,) or (M, D), got {tuple(positions.shape)}")
    # float64: exact enough that the tie tolerance below is the only approximation.
    p = positions.detach().to(torch.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.numel() > 0 and not bool(torch.isfinite(p).all() & (p >= 0).all() & (p <= 1).all()):
        # Catches raw slice indices passed instead of normalised positions, which would
        # silently turn the loss into SimCLR.
        raise ValueError("positions must be normalised to [0, 1] (e.g. (i + 1) / n_slices)")
    threshold = float(threshold)
    tolerance = min(_TIE_TOLERANCE, 0.5 * threshold)
    delta = (p[:, None, :] - p[None, :, :]).abs()  # (M, M, D)
    mask = (delta < threshold - tolerance).all(dim=-1)
    mask.fill_diagonal_(False)
    return mask


def instance_positive_mask(num_samples: int, num_views: int = 2, device: torch.device | str | None = None) -> Tensor:
    """SimCLR positives: the other views of the same sample.

    Rows are ordered [view 0 of all N samples; view 1 of all N; ...].

    Returns:
        (N * num_views, N * num_views) bool mask, True where same sample and different row.
    """
    if int(num_samples) < 1 or int(num_views) < 1:
        raise ValueError(f"num_samples and num_views must be >= 1, got {num_samples}, {num_views}")
    sample_index = torch.arange(num_samples * num_views, device=device) % num_samples
    mask = sample_index[:, None] == sample_index[None, :]
    mask.fill_diagonal_(False)
    return mask


def masked_supcon_loss(
    features: Tensor,
    positive_mask: Tensor,
    tau: float = 0.1,
    base_temperature: float | None = None,
    valid: Tensor | None = None,
    excluded: Tensor | None = None,
) -> Tensor:
    """SupCon loss with an explicit positive mask.

    Args:
        features: (..., M, C) features, any leading batch dims (the dense loss passes
            (S, M, C)). L2-normalised here, in float32.
        positive_mask: (M, M) bool, or broadcastable to (..., M, M). The diagonal is ignored.
        tau: temperature.
        base_temperature: if given, the loss is multiplied by tau / base_temperature (the
            authors' left-over factor, e.g. 0.07). Default: no factor.
        valid: optional (..., M) bool, broadcastable to the features' leading dims: samples
            marked False (e.g. dense cells of zero padding) are neither anchors nor in any
            anchor's positives or denominator.
        excluded: optional (M, M) bool (or broadcastable to (..., M, M)): pairs that are neither
            positives nor negatives of each other (left out of the anchor's denominator).

    Returns:
        Scalar float32 loss: mean over anchors with >= 1 positive, then over leading dims
        (leading slices without any positive are skipped).
    """
    check_tau(tau, base_temperature)
    tau = float(tau)
    if features.ndim < 2:
        raise ValueError(f"features must have shape (..., M, C), got {tuple(features.shape)}")
    m = features.shape[-2]
    if m < 2:
        raise ValueError(f"SupCon needs at least 2 samples along dim -2, got features {tuple(features.shape)}")
    if positive_mask.ndim < 2 or positive_mask.shape[-2:] != (m, m):
        raise ValueError(
            f"positive_mask must have shape (..., {m}, {m}) to match features {tuple(features.shape)}, "
            f"got {tuple(positive_mask.shape)}"
        )

    with float32_math(features.device):
        # contiguous: a permuted (S, M, C) view makes CPU bmm fall back to one tiny matmul per
        # location (~300x slower for S = 32^3).
        f = F.normalize(features.float(), dim=-1).contiguous()
        logits = f @ f.transpose(-1, -2) / tau  # (..., M, M), bounded by 1/tau
        self_mask = torch.eye(m, dtype=torch.bool, device=f.device)
        positives = positive_mask.to(device=f.device, dtype=torch.bool) & ~self_mask
        if valid is not None:
            if valid.shape[-1] != m:
                raise ValueError(f"valid must have shape (..., {m}), got {tuple(valid.shape)}")
            valid = valid.to(device=f.device, dtype=torch.bool)
            positives = positives & valid[..., None, :] & valid[..., :, None]
            # a large finite value, not -inf: an anchor with no valid partner stays finite (and unused)
            logits = logits.masked_fill(~valid[..., None, :], -1e4)

        if excluded is not None:
            excluded = excluded.to(device=f.device, dtype=torch.bool) & ~self_mask
            positives = positives & ~excluded
            logits = logits.masked_fill(excluded, -1e4)

        # Denominator excludes k == a: mask the diagonal before the (stable) logsumexp.
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)

        # where() instead of multiplication: the diagonal holds -inf and -inf * 0 = nan.
        num_pos = positives.sum(dim=-1)  # (..., M)
        sum_log_prob_pos = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=-1)
        loss_anchor = -sum_log_prob_pos / num_pos.clamp(min=1)

        valid = (num_pos > 0).expand_as(loss_anchor).float()
        per_slice = (loss_anchor * valid).sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)
        slice_valid = (valid.sum(dim=-1) > 0).float()
        loss = (per_slice * slice_valid).sum() / slice_valid.sum().clamp(min=1)

        if base_temperature is not None:
            loss = loss * (tau / float(base_temperature))
    return loss


def branch_positive_mask(
    positions: Tensor | None,
    num_samples: int,
    threshold: float,
    positives: str,
    device: torch.device,
) -> Tensor:
    """(2N, 2N) positives for features stacked [dominant; auxiliary] with positions [p; p]."""
    check_positives(positives)
    if positives == "instance":
        return instance_positive_mask(num_samples, 2, device=device)
    if positions is None:
        raise ValueError("positives='position' needs positions, got None")
    if positions.ndim not in (1, 2) or positions.shape[0] != num_samples:
        raise ValueError(
            f"positions must have shape ({num_samples},) or ({num_samples}, D) to match the batch, "
            f"got {tuple(positions.shape)}"
        )
    return position_positive_mask(torch.cat([positions, positions], dim=0), threshold).to(device)


class PositionSupConLoss(nn.Module):
    """SupCon over two branches with position-based (PCL) or instance (SimCLR) positives.

    Used for the MACL image-level loss Lg (paper eq. 11): SupCon([Z_g; Z~_g], [p; p]).

    Args:
        threshold: positives are pairs with |p_a - p_b| < threshold on every axis.
        tau: temperature.
        positives: "position" (PCL/MACL) or "instance" (SimCLR: only the other view).
        base_temperature: optional tau / base_temperature factor (authors' code: 0.07).

    Shapes:
        features_dominant, features_auxiliary: (N, C); positions: (N,) or (N, D)
        (ignored, may be None, for positives="instance"). Output: scalar float32.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        tau: float = 0.1,
        positives: str = "position",
        base_temperature: float | None = None,
    ) -> None:
        super().__init__()
        check_threshold(threshold)
        check_tau(tau, base_temperature)
        check_positives(positives)
        self.threshold = float(threshold)
        self.tau = float(tau)
        self.positives = positives
        self.base_temperature = base_temperature

    def forward(self, features_dominant: Tensor, features_auxiliary: Tensor, positions: Tensor | None) -> Tensor:
        if features_dominant.ndim != 2 or features_dominant.shape != features_auxiliary.shape:
            raise ValueError(
                "features_dominant and features_auxiliary must both have shape (N, C), got "
                f"{tuple(features_dominant.shape)} and {tuple(features_auxiliary.shape)}"
            )
        n = features_dominant.shape[0]
        mask = branch_positive_mask(positions, n, self.threshold, self.positives, features_dominant.device)
        features = torch.cat([features_dominant, features_auxiliary], dim=0)  # (2N, C)
        return masked_supcon_loss(features, mask, tau=self.tau, base_temperature=self.base_temperature)

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, tau={self.tau}, positives={self.positives!r}, "
            f"base_temperature={self.base_temperature}"
        )

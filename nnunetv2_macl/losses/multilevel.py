"""Multi-level contrastive loss L_MLC of MACL.

Reference:
    - MACL: Zeng et al., "Multi-level Asymmetric Contrastive Learning for Volumetric Medical
      Image Segmentation Pre-training", eq. 10: L_MLC = l1 Lg + l2 Ld + l3 LER,
      defaults (1.0, 0.5, 1.0).

Switching components off (weight 0) gives the paper's baselines and ablations, e.g. PCL /
SimCLR = (1, 0, 0), "image level only" = (1, 0, 1) (METHOD.md, "Baselines and ablations").
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .dense_contrastive import DENSE_CONTRASTS, DENSE_FORMS, dense_contrastive_loss
from .equivariance import equivariance_loss
from .global_contrastive import global_contrastive_loss
from .supcon import check_positives, check_tau, check_threshold

# component name -> (weight index, output keys it needs)
_COMPONENTS = {
    "Lg": (0, ("global_dominant", "global_auxiliary")),
    "Ld": (1, ("dense_dominant", "dense_auxiliary")),
    "LER": (2, ("bottleneck_dominant", "bottleneck_auxiliary")),
}


class MultiLevelContrastiveLoss(nn.Module):
    """L_MLC = l1 * Lg + l2 * Ld + l3 * LER.

    Args:
        weights: (l1, l2, l3) >= 0, not all zero. A component with weight 0 is not computed.
        threshold, tau, positives, base_temperature: passed to Lg and Ld (see
            :func:`global_contrastive_loss`).
        dense_form: "supcon" (eq. 12), "mse" or "byol" (Table VII).
        dense_contrast, dense_locations, dense_slice_positives: the dense SupCon's contrast ("slices",
            eq. 12, or "locations") and its options (:func:`dense_contrastive_loss`).
        ler_content_mask: LER over the content cells of its dominant bottleneck only (default), or over
            every cell, padding included (False: the paper's loss, whose crops have no padding).

    Forward:
        outputs: dict with "global_dominant", "global_auxiliary" (N, C);
            "dense_dominant", "dense_auxiliary" (N, C, *S);
            "bottleneck_dominant" (N, C, *s), "bottleneck_auxiliary" (N, C, *S).
            Keys of switched-off components may be absent.
        positions: (N,) or (N, D) normalised positions (may be None with positives="instance").
        content: optional (N, 1, *crop) content mask of the input (1 image, 0 padding); Ld and LER
            (with ``ler_content_mask``) leave out the cells that are mostly padding (the same rule, each on its own grid: Ld's dense
            map, LER's dominant bottleneck, :func:`~nnunetv2_macl.losses.dense_contrastive.content_cells`).

    Returns:
        (total, {"Lg", "Ld", "LER"}): total is a float32 scalar with graph; the dict holds the
        unweighted components, detached (0 for switched-off ones).
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 0.5, 1.0),
        threshold: float = 0.1,
        tau: float = 0.1,
        positives: str = "position",
        dense_form: str = "supcon",
        base_temperature: float | None = None,
        dense_contrast: str = "slices",
        dense_locations: int = 64,
        dense_slice_positives: bool = False,
        ler_content_mask: bool = True,
    ) -> None:
        super().__init__()
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"weights must be three finite numbers >= 0 (l1, l2, l3), got {weights!r}")
        if not any(w > 0 for w in weights):
            raise ValueError(f"at least one of the weights (l1, l2, l3) must be > 0, got {weights!r}")
        if dense_form not in DENSE_FORMS:
            raise ValueError(f"dense_form must be one of {DENSE_FORMS}, got {dense_form!r}")
        check_threshold(threshold)
        check_tau(tau, base_temperature)
        check_positives(positives)
        self.weights = weights
        self.threshold = float(threshold)
        self.tau = float(tau)
        self.positives = positives
        self.dense_form = dense_form
        self.base_temperature = base_temperature
        if dense_contrast not in DENSE_CONTRASTS:
            raise ValueError(f"dense_contrast must be one of {DENSE_CONTRASTS}, got {dense_contrast!r}")
        self.dense_contrast = dense_contrast
        self.dense_locations = int(dense_locations)
        self.dense_slice_positives = bool(dense_slice_positives)
        self.ler_content_mask = bool(ler_content_mask)

    def global_loss(self, z_dominant: Tensor, z_auxiliary: Tensor, positions: Tensor | None) -> Tensor:
        """Lg alone, with this loss's settings (also used by the collapse diagnostics)."""
        return global_contrastive_loss(z_dominant, z_auxiliary, positions, self.threshold, self.tau, self.positives,
                                       self.base_temperature)

    def dense_loss(self, z: Tensor, z_tilde: Tensor, positions: Tensor | None, content: Tensor | None = None) -> Tensor:
        """Ld alone, with this loss's settings."""
        return dense_contrastive_loss(z, z_tilde, positions, self.threshold, self.tau, self.dense_form, self.positives,
                                      self.base_temperature, content, self.dense_contrast, self.dense_locations,
                                      self.dense_slice_positives)

    def ler_content(self, content: Tensor | None) -> Tensor | None:
        """The content mask LER uses: the input's (cells mostly padding left out), or None (every cell)."""
        return content if self.ler_content_mask else None

    def _pair(self, outputs: Mapping[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
        index, keys = _COMPONENTS[name]
        for key in keys:
            if outputs.get(key) is None:
                raise ValueError(
                    f"{name} has weight l{index + 1} = {self.weights[index]} but outputs lacks {key!r} "
                    f"(got keys {sorted(outputs)})"
                )
        return outputs[keys[0]], outputs[keys[1]]

    def forward(self, outputs: Mapping[str, Tensor], positions: Tensor | None,
                content: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        components: dict[str, Tensor] = {}
        if self.weights[0] > 0:
            z, z_tilde = self._pair(outputs, "Lg")
            components["Lg"] = self.global_loss(z, z_tilde, positions)
        if self.weights[1] > 0:
            z, z_tilde = self._pair(outputs, "Ld")
            components["Ld"] = self.dense_loss(z, z_tilde, positions, content)
        if self.weights[2] > 0:
            y, y_tilde = self._pair(outputs, "LER")
            components["LER"] = equivariance_loss(y, y_tilde, self.ler_content(content))

        total = sum(self.weights[_COMPONENTS[name][0]] * value for name, value in components.items())
        device = total.device
        logged = {
            name: components[name].detach() if name in components else torch.zeros((), device=device)
            for name in _COMPONENTS
        }
        return total, logged

    def extra_repr(self) -> str:
        return (
            f"weights={self.weights}, threshold={self.threshold}, tau={self.tau}, "
            f"positives={self.positives!r}, dense_form={self.dense_form!r}, "
            f"base_temperature={self.base_temperature}, dense_contrast={self.dense_contrast!r}, "
            f"dense_locations={self.dense_locations}, dense_slice_positives={self.dense_slice_positives}, "
            f"ler_content_mask={self.ler_content_mask}"
        )

"""Part (a) / E4: how much of a feature's variance lies within slices, and how much the slice position
explains of the rest (per channel, over the content cells of all validation slices)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from nnunetv2_macl.losses.dense_contrastive import content_cells as content_cell_mask

POSITION_BINS = 10
LIVE_VARIANCE = 1e-10  # channels whose total variance is below this are constant ("dead")


def content_cells(size: Sequence[int], canvas: Sequence[int], fmap: Sequence[int]) -> tuple[int, int]:
    """How many cells per axis of a feature map (stride canvas/fmap) lie on an image of ``size`` placed at
    the top left of the canvas: the cells the dense loss counts as content (``losses.dense_contrastive.
    content_cells``: a window centred on pixel stride*j at least half image), taken per axis so that the
    content is a rectangle ``[:h, :w]``; at least one cell per axis."""
    out = []
    for s, c, f in zip(size, canvas, fmap):
        mask = torch.zeros(1, 1, int(c), 1)
        mask[:, :, :int(s)] = 1
        n = int(content_cell_mask(mask, (int(f), 1)).sum())
        out.append(max(1, min(int(f), n)))
    return out[0], out[1]


class VarianceDecomposition:
    """Streaming per-channel decomposition of a feature's variance over slices.

    Slice s contributes n_s cells with mean m_s and (population) variance v_s per channel. With weights
    n_s (so that slices of different sizes count by their cells and the identity is exact):
    ``spatial = sum n_s v_s / N``, ``across = sum n_s (m_s - M)^2 / N``, ``total = spatial + across``
    = the variance of all cells of all slices. ``position_explained`` per channel: the share of
    ``across`` that the slice position explains (between-bin variance of m_s over position bins)."""

    def __init__(self, bins: int = POSITION_BINS) -> None:
        self.bins = bins
        self.counts: list[np.ndarray] = []
        self.means: list[np.ndarray] = []
        self.variances: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []

    def add(self, maps: torch.Tensor, positions: Sequence[float] | None = None) -> None:
        """``maps``: (B, C, *spatial) content cells of B slices of one size."""
        flat = maps.detach().double().flatten(2)
        n = flat.shape[-1]
        self.counts.append(np.full(flat.shape[0], n, dtype=np.float64))
        self.means.append(flat.mean(-1).cpu().numpy())
        self.variances.append(flat.var(-1, unbiased=False).cpu().numpy())
        self.positions.append(np.asarray(positions if positions is not None else np.full(flat.shape[0], np.nan),
                                         dtype=np.float64))

    def result(self) -> dict:
        """spatial / across / total per channel, the live-channel mask and the summary fractions."""
        n = np.concatenate(self.counts)
        m = np.concatenate(self.means)
        v = np.concatenate(self.variances)
        p = np.concatenate(self.positions)
        w = n / n.sum()
        grand = (w[:, None] * m).sum(0)
        spatial = (w[:, None] * v).sum(0)
        across = (w[:, None] * (m - grand) ** 2).sum(0)
        total = spatial + across
        live = total > LIVE_VARIANCE
        out = {"spatial": spatial, "across": across, "total": total, "live": live,
               "num_slices": int(len(n)), "channels": int(len(total)), "dead_channels": int((~live).sum())}
        out["spatial_fraction"] = float(np.mean(spatial[live] / total[live])) if live.any() else float("nan")
        explained = np.full(len(total), np.nan)
        if np.isfinite(p).all() and len(n) > 1:
            # positions (i+1)/n lie in (0, 1]: bin b holds (b/bins, (b+1)/bins]
            bin_of = np.clip(np.ceil(np.round(p * self.bins, 9)).astype(int) - 1, 0, self.bins - 1)
            between = np.zeros(len(total))
            for b in np.unique(bin_of):
                sel = bin_of == b
                wb = w[sel].sum()
                between += wb * ((w[sel, None] * m[sel]).sum(0) / wb - grand) ** 2
            ok = across > LIVE_VARIANCE
            explained[ok] = between[ok] / across[ok]
        out["position_explained"] = explained
        ok = live & np.isfinite(explained)
        out["position_share"] = float(np.mean(explained[ok])) if ok.any() else float("nan")
        # share of the total variance that is a function of the slice position alone
        out["position_fraction_of_total"] = (float(np.mean(explained[ok] * across[ok] / total[ok]))
                                             if ok.any() else float("nan"))
        return out


def variance_decomposition(slice_maps: Sequence[torch.Tensor], positions: Sequence[float] | None = None) -> dict:
    """:class:`VarianceDecomposition` of slices given one by one as (C, *spatial) maps (sizes may differ)."""
    acc = VarianceDecomposition()
    for i, s in enumerate(slice_maps):
        acc.add(s[None], None if positions is None else [positions[i]])
    return acc.result()


def summarise_decomposition(d: dict) -> dict:
    """The JSON-friendly part of :meth:`VarianceDecomposition.result`."""
    live = d["live"]
    return {"spatial_fraction": d["spatial_fraction"], "position_share": d["position_share"],
            "position_fraction_of_total": d["position_fraction_of_total"],
            "mean_total_variance": float(np.mean(d["total"])), "channels": d["channels"],
            "dead_channels": d["dead_channels"], "num_slices": d["num_slices"],
            "spatial_fraction_median": float(np.median(d["spatial"][live] / d["total"][live])) if live.any()
            else float("nan")}

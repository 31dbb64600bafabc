"""The asymmetric two-branch MACL structure around the network nnU-Net builds from its plans.

MACL (Zeng et al., "Multi-level Asymmetric Contrastive Learning for Medical Image Segmentation
Pre-training", IEEE JBHI 2026, doi:10.1109/JBHI.2026.3669549 / arXiv:2309.11876):

* dominant branch  = down(lambda) -> encoder -> first N decoder stages (the decoder output is the
  pixel projection Z^l; g_ins on the decoder output gives Z^g);
* auxiliary branch = encoder (shared parameters by default) -> g~_pix (Z~^l) / g~_ins (Z~^g).

lambda per axis is 1 / product of the strides of the last N encoder stages, so that the dominant
decoder output and the auxiliary bottleneck have the same spatial size. The wrapped ``network`` is
the untouched nnU-Net network: its ``state_dict()`` is what fine-tuning loads, key for key.

2-D and 3-D: strides, lambda and the crop divisor are per axis (anisotropic 3-D plans such as a last
stage with stride [1, 2, 2] give a different lambda per axis). Residual encoders (nnU-Net's ResEnc
presets, ``ResidualEncoderUNet``): the stem runs inside ``encoder.forward``, so both branches pass
through it and it is trained and saved under ``encoder.stem.*`` (and its alias
``decoder.encoder.stem.*``), which the ``"encoder."`` prefix of :func:`pretrained_prefixes` covers.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nnunetv2_macl.data.augmentation import downsample
from nnunetv2_macl.model.projectors import DenseProjector, InstanceProjector, PixelProjector

ENCODER_MODES = ("shared", "independent", "ema")


def _unwrap(network: nn.Module) -> nn.Module:
    network = getattr(network, "module", network)  # DDP
    return getattr(network, "_orig_mod", network)  # torch.compile


def encoder_strides(network: nn.Module) -> list[list[int]]:
    """Per-stage, per-axis strides of the nnU-Net encoder (stage 0 first)."""
    encoder = _unwrap(network).encoder
    ndim = 3 if encoder.conv_op is nn.Conv3d else 2
    out = []
    for s in encoder.strides:
        s = [int(s)] * ndim if np.isscalar(s) else [int(i) for i in s]
        out.append(s)
    return out


def downsampling_factors(network: nn.Module, decoder_blocks: int) -> list[float]:
    """lambda per axis = 1 / prod(strides of the last N encoder stages); 1.0 for N = 0."""
    strides = encoder_strides(network)
    n_decoder_stages = len(_unwrap(network).decoder.stages)
    if not 0 <= decoder_blocks <= n_decoder_stages:
        raise ValueError(f"decoder_blocks must be in [0, {n_decoder_stages}] for this network, got {decoder_blocks}")
    ndim = len(strides[0])
    if decoder_blocks == 0:
        return [1.0] * ndim
    prod = np.prod(np.array(strides[-decoder_blocks:]), axis=0)
    return [1.0 / float(p) for p in prod]


def required_divisor(network: nn.Module, decoder_blocks: int) -> list[int]:
    """The crop must be divisible per axis by (1/lambda) x the encoder's total stride, so that both
    branches' feature maps align exactly."""
    total = np.prod(np.array(encoder_strides(network)), axis=0)
    lam = downsampling_factors(network, decoder_blocks)
    return [int(round(t / l)) for t, l in zip(total, lam)]


def crop_problems(network: nn.Module, decoder_blocks: int, crop: Sequence[int]) -> list[str]:
    """Why ``crop`` does not work for MACL with this network (empty list: it does).

    Each axis must be a multiple of :func:`required_divisor` d (both branches' feature maps then align
    exactly), and the dominant branch's bottleneck (``crop / d`` voxels per axis) must hold more than
    one voxel in total, since instance normalisation needs more than one spatial element. Per axis a
    single voxel is fine: in 3-D, insisting on two per axis would make the crop 8x the plan's patch.
    """
    divisor = required_divisor(network, decoder_blocks)
    crop = [int(c) for c in crop]
    if len(crop) != len(divisor):
        return [f"the crop needs {len(divisor)} values for this network, got {crop}"]
    problems = [f"axis {i}: {c} is not a positive multiple of {d}" for i, (c, d) in enumerate(zip(crop, divisor))
                if c < d or c % d]
    if not problems and int(np.prod([c // d for c, d in zip(crop, divisor)])) < 2:
        problems.append(f"the dominant bottleneck would be a single voxel (crop / {divisor} = 1 on every axis); "
                        f"double at least one axis")
    return problems


def fitting_crop_size(network: nn.Module, decoder_blocks: int, patch_size: Sequence[int]) -> list[int]:
    """The smallest crop that holds ``patch_size`` (the plan's) and satisfies :func:`crop_problems`:
    each axis rounded up to a multiple of d; if the dominant bottleneck is then a single voxel, the axis
    with the largest ``patch / d`` is grown by d."""
    divisor = required_divisor(network, decoder_blocks)
    if len(patch_size) != len(divisor):
        raise ValueError(f"patch_size needs {len(divisor)} values for this network, got {list(patch_size)}")
    crop = [max(int(math.ceil(int(p) / d)) * d, d) for p, d in zip(patch_size, divisor)]
    if int(np.prod([c // d for c, d in zip(crop, divisor)])) < 2:
        i = int(np.argmax([int(p) / d for p, d in zip(patch_size, divisor)]))
        crop[i] += divisor[i]
    return crop


def reconstruction_stride(network: nn.Module, decoder_blocks: int) -> list[int]:
    """Per-axis stride (input pixels per cell) of decoder stage N's output on a full-resolution input:
    the product of the strides of encoder stages 0 .. n_stages - 1 - N."""
    strides = encoder_strides(network)
    return [int(v) for v in np.prod(np.array(strides[:len(strides) - decoder_blocks]), axis=0)]


def pretrained_prefixes(decoder_blocks: int) -> list[str]:
    """State-dict key prefixes trained by MACL (handed to fine-tuning)."""
    prefixes = ["encoder.", "decoder.encoder."]  # UNetDecoder keeps a reference to the encoder
    for i in range(decoder_blocks):
        prefixes += [f"decoder.stages.{i}.", f"decoder.transpconvs.{i}."]
    return prefixes


def decoder_stage_outputs(network: nn.Module, skips: Sequence[torch.Tensor], num_stages: int) -> list[torch.Tensor]:
    """The outputs of decoder stages 0..num_stages-1 of nnU-Net's UNetDecoder on the encoder outputs
    ``skips`` (transposed convolution, concatenation [upsampled, skip], stage), as its forward computes them."""
    decoder = _unwrap(network).decoder
    x = skips[-1]
    outputs = []
    for s in range(num_stages):
        x = decoder.transpconvs[s](x)
        x = torch.cat((x, skips[-(s + 2)]), 1)
        x = decoder.stages[s](x)
        outputs.append(x)
    return outputs


class MACLNetwork(nn.Module):
    """Wraps an nnU-Net segmentation network into the MACL dominant/auxiliary structure.

    Args:
        network: the network from ``get_network_from_plans`` (PlainConvUNet, ResidualEncoderUNet, ...).
        decoder_blocks: N, the number of decoder stages pretrained in the dominant branch (0 = PCL-style).
        projection_dim: output size of the image-level projectors (128 in the paper).
        global_through_decoder: Z^g = g_ins(d_N(e(down(V1)))) (paper eq. 4, authors' code) when True;
            g_ins(e(down(V1))) (paper eq. 9) when False.
        encoder_mode: "shared" (paper default), "independent" (auxiliary branch has its own encoder)
            or "ema" (auxiliary encoder is an exponential moving average of the dominant one).
        global_pooling: the image-level descriptor of both g_ins heads (see ``GlobalDescriptor``).
        shared_global_head: one g_ins for both views (PCL / SimCLR, whose originals use one head);
            needs both branches to feed it the same channels (N = 0 or Z^g from the encoder).
        dense_head: Z^l = g_pix(d_N(...)) with a dominant pixel projector (``DenseProjector``) instead of
            the decoder output itself (the paper).
        reconstruction_head: a 1x1 convolution from decoder stage N's output to the input channels, for the
            masked reconstruction term (:mod:`nnunetv2_macl.losses.masked_reconstruction`); needs N >= 1.
    """

    def __init__(self, network: nn.Module, decoder_blocks: int = 2, projection_dim: int = 128,
                 global_through_decoder: bool = True, encoder_mode: str = "shared",
                 ema_momentum: float = 0.99, global_pooling: str = "max",
                 shared_global_head: bool = False, dense_head: bool = False,
                 reconstruction_head: bool = False) -> None:
        super().__init__()
        if encoder_mode not in ENCODER_MODES:
            raise ValueError(f"encoder_mode must be one of {ENCODER_MODES}, got {encoder_mode!r}")
        self.network = network
        self.decoder_blocks = decoder_blocks
        self.global_through_decoder = global_through_decoder
        self.encoder_mode = encoder_mode
        self.ema_momentum = ema_momentum
        self.scale = downsampling_factors(network, decoder_blocks)

        encoder = network.encoder
        bottleneck_channels = int(encoder.output_channels[-1])
        # channels of decoder stage N (the dominant pixel projection); the bottleneck for N = 0
        dense_channels = (int(encoder.output_channels[-(decoder_blocks + 1)]) if decoder_blocks > 0
                          else bottleneck_channels)
        self.dense_channels = dense_channels
        self.bottleneck_channels = bottleneck_channels

        if encoder_mode == "shared":
            self.auxiliary_encoder = None
        else:
            self.auxiliary_encoder = copy.deepcopy(encoder)
            if encoder_mode == "ema":
                for p in self.auxiliary_encoder.parameters():
                    p.requires_grad_(False)

        global_in = dense_channels if (global_through_decoder and decoder_blocks > 0) else bottleneck_channels
        self.global_head_dominant = InstanceProjector(global_in, 128, projection_dim, global_pooling)
        if shared_global_head and global_in != bottleneck_channels:
            raise ValueError(f"a shared image-level head needs the same channels in both branches, got {global_in} "
                             f"(dominant) and {bottleneck_channels} (auxiliary bottleneck)")
        # None: the auxiliary view goes through the dominant head (one head for both views)
        self.global_head_auxiliary = (None if shared_global_head
                                      else InstanceProjector(bottleneck_channels, 128, projection_dim, global_pooling))
        self.pixel_head_auxiliary = PixelProjector(bottleneck_channels, dense_channels, encoder.conv_op,
                                                   encoder.norm_op, encoder.norm_op_kwargs)
        self.pixel_head_dominant = (DenseProjector(dense_channels, encoder.conv_op, encoder.norm_op,
                                                   encoder.norm_op_kwargs) if dense_head else None)
        if reconstruction_head and decoder_blocks < 1:
            raise ValueError("the reconstruction head sits on decoder stage N: it needs decoder_blocks >= 1")
        self.reconstruction_head = None
        if reconstruction_head:
            # the input's channels: those of the encoder's first convolution (the stem's, for residual encoders)
            input_channels = next(m for m in encoder.modules() if isinstance(m, encoder.conv_op)).in_channels
            self.reconstruction_head = encoder.conv_op(dense_channels, int(input_channels), 1)
        self.reconstruction_stride = reconstruction_stride(network, decoder_blocks)

    # -- pieces -------------------------------------------------------------------------------
    def _aux_global_head(self) -> InstanceProjector:
        return self.global_head_dominant if self.global_head_auxiliary is None else self.global_head_auxiliary

    def _aux_encoder(self) -> nn.Module:
        return self.network.encoder if self.auxiliary_encoder is None else self.auxiliary_encoder

    def partial_decode(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run the first N decoder stages (with their transposed convolutions and skips)."""
        outputs = decoder_stage_outputs(self.network, skips, self.decoder_blocks)
        return outputs[-1] if outputs else skips[-1]

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return downsample(x, self.scale)

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA encoder mode: move the auxiliary encoder towards the dominant (trained) encoder."""
        if self.encoder_mode != "ema":
            return
        m = self.ema_momentum
        for pa, pd in zip(self.auxiliary_encoder.parameters(), self.network.encoder.parameters()):
            pa.mul_(m).add_(pd.detach(), alpha=1 - m)
        for ba, bd in zip(self.auxiliary_encoder.buffers(), self.network.encoder.buffers()):
            ba.copy_(bd)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, i1: torch.Tensor, v1: torch.Tensor, i2: torch.Tensor, v2: torch.Tensor,
                need: Iterable[str] = ("global", "dense", "equivariance"),
                masked: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Compute the projections the enabled losses need.

        i1/i2: T_fix views (N, C, *S) of the dominant/auxiliary branch; v1/v2: T_var views.
        need: subset of {"global", "dense", "equivariance", "descriptors", "reconstruction"}; "descriptors"
            (with "global") adds the pooled image-level descriptors before the MLPs (diagnostics);
            "reconstruction" runs ``masked`` (the full-resolution fixed view with cells masked) through the
            encoder, the first N decoder stages and the reconstruction head (key "reconstruction").
        Returns a dict with keys global_dominant/global_auxiliary (N, D), dense_dominant/
        dense_auxiliary (N, C_D, *s), bottleneck_dominant/bottleneck_auxiliary,
        descriptor_dominant/descriptor_auxiliary (N, C), as needed.
        Views of one branch go through the encoder as one concatenated batch (instance norm makes
        this identical to two passes and it halves the kernel launches).
        """
        need = set(need)
        n = i1.shape[0]
        out: dict[str, torch.Tensor] = {}
        encoder = self.network.encoder
        aux_encoder = self._aux_encoder()

        # dominant branch
        dom_inputs = []
        if need & {"dense", "equivariance"}:
            dom_inputs.append(i1)
        if "global" in need:
            dom_inputs.append(v1)
        if dom_inputs:
            skips = encoder(self.down(torch.cat(dom_inputs, 0)))
            k = 0
            if need & {"dense", "equivariance"}:
                fixed_skips = [s[:n] for s in skips]
                out["bottleneck_dominant"] = fixed_skips[-1]
                if "dense" in need:
                    decoded = self.partial_decode(fixed_skips)
                    out["dense_dominant"] = (decoded if self.pixel_head_dominant is None
                                             else self.pixel_head_dominant(decoded))
                k = n
            if "global" in need:
                var_skips = [s[k:] for s in skips]
                feats = self.partial_decode(var_skips) if self.global_through_decoder else var_skips[-1]
                self._project_global(self.global_head_dominant, feats, "dominant", need, out)

        if "reconstruction" in need:
            if self.reconstruction_head is None or masked is None:
                raise ValueError("reconstruction needs a network built with reconstruction_head=True and a masked input")
            decoded = self.partial_decode(encoder(masked))
            out["reconstruction"] = self.reconstruction_head(decoded)

        # auxiliary branch
        aux_inputs = []
        if need & {"dense", "equivariance"}:
            aux_inputs.append(i2)
        if "global" in need:
            aux_inputs.append(v2)
        if aux_inputs:
            bottleneck = aux_encoder(torch.cat(aux_inputs, 0))
            bottleneck = bottleneck[-1] if isinstance(bottleneck, (list, tuple)) else bottleneck
            k = 0
            if need & {"dense", "equivariance"}:
                fixed = bottleneck[:n]
                out["bottleneck_auxiliary"] = fixed
                if "dense" in need:
                    out["dense_auxiliary"] = self.pixel_head_auxiliary(fixed)
                k = n
            if "global" in need:
                self._project_global(self._aux_global_head(), bottleneck[k:], "auxiliary", need, out)
        return out

    @staticmethod
    def _project_global(head: InstanceProjector, feats: torch.Tensor, branch: str, need: set,
                        out: dict[str, torch.Tensor]) -> None:
        descriptor = head.describe(feats)
        out[f"global_{branch}"] = head.mlp(descriptor)
        if "descriptors" in need:
            out[f"descriptor_{branch}"] = descriptor

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not the nnU-Net network (projectors, auxiliary encoder copy)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("network.")}

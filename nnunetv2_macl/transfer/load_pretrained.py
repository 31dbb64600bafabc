"""Checkpoint -> nnU-Net network: lenient, reported transfer of pretrained weights.

What is transferred (``/work/shared/METHOD.md``, "What is handed to fine-tuning"): the tensors a MACL
pretraining trained (the checkpoint's ``macl.pretrained_prefixes``, by default the encoder plus
``decoder.stages.i`` / ``decoder.transpconvs.i`` for ``i < macl.decoder_blocks``), matched by exact
state_dict key and shape. The segmentation layers and the untrained decoder stages keep their
initialisation. A checkpoint without a ``macl`` block (e.g. an nnU-Net ``checkpoint_final.pth``
given to ``-pretrained_weights``) is treated the way nnU-Net treats it: everything except the
segmentation layers is a candidate.

Across plans (pretrained with plan A, fine-tuned with plan B of the same architecture class):
encoder stages are matched from the top (stage i of A <-> stage i of B, the same resolution
level); decoder stages are matched by the encoder stage they join, so when A is deeper by d stages
``decoder.stages.j`` of B takes ``decoder.stages.{j+d}`` of A (and stages A has and B lacks are
left unused, stages B has and A lacks keep their initialisation). Tensors of equal shape load;
convolution kernels of another spatial size are adapted (:func:`adapt_kernel`: an axis shrunk to 1
is summed over, an axis grown is zero-padded around the pretrained kernel, which keeps its
response exactly; transposed-convolution kernels, whose size is the stride, are averaged /
repeated).

Matching is by role, not by shape alone (:func:`decoder_input_role_change`). ``decoder.transpconvs.0``
reads the bottleneck; ``decoder.transpconvs.j`` (j > 0) reads the output of ``decoder.stages.{j-1}``.
Under a depth offset exactly one decoder stage pairs an index 0 with an index > 0. That stage's
transposed convolution is refused ("role differs"), although its shape fits. The convolutions that
read that stage's input (the concatenation [transposed-convolution output, encoder skip]) take only
the skip channels; the other channels keep their initialisation. Every other decoder tensor reads the
same kind of input on both sides and loads. An encoder stage whose stride differs between the
checkpoint's plan (``macl.network_arch_init_kwargs.strides``, or nnU-Net's ``init_args``) and the
network loads unchanged, with a note naming the stage and both strides.

Every tensor of the network is accounted for in a :class:`TransferReport`: loaded, adapted (the
first convolution when the number of input channels differs, kernels of another size, the skip half
of a stage input) or skipped with the reason ("not pretrained", "shape mismatch", "missing in
checkpoint", "role differs"). When nothing, or less than ``min_fraction`` of the encoder's tensors,
fits, :class:`IncompatibleCheckpointError` is raised and the network is left untouched, so that a
wrong checkpoint never turns silently into training from scratch.

Reading is always ``weights_only`` (no arbitrary unpickling, see :func:`load_weights_only`).

Parameter aliases: nnU-Net's networks expose one tensor under several state_dict keys
(``...convs.0.conv.weight`` is ``...convs.0.all_modules.0.weight``; ``decoder.encoder.*`` is
``encoder.*``). The report counts each tensor once, under its first key.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from nnunetv2_macl.training.checkpoint import CheckpointError, load_checkpoint
from nnunetv2_macl.transfer.identity import (
    UnsupportedCheckpointFormatError, checkpoint_format_version, citation_text)
from nnunetv2_macl.errors import IncompatibleCheckpointError

SEG_LAYER_MARK = "seg_layers."
ENCODER_PREFIX = "encoder."

REASON_NOT_PRETRAINED = "not pretrained"
REASON_SEG_HEAD = "not pretrained (segmentation head, kept at initialisation)"
REASON_SHAPE = "shape mismatch"
REASON_MISSING = "missing in checkpoint"
#: a tensor whose shape fits but which reads another kind of input in the checkpoint's network
REASON_ROLE = "role differs"
#: what of a checkpoint's pretrained tensors is copied: everything it pretrained (the paper: encoder and
#: decoder stages 1..N) or the encoder only (its decoder stages keep their initialisation)
TRANSFER_SCOPES = ("pretrained", "encoder")

_DECODER_STAGE = re.compile(r"^decoder\.(stages|transpconvs)\.(\d+)\.(.*)$")
_ENCODER_STAGE = re.compile(r"^encoder\.stages\.(\d+)\.")


# --------------------------------------------------------------------------------------------------
# safe reading
# --------------------------------------------------------------------------------------------------
def numpy_scalar_safe_globals() -> list:
    """The minimal allow-list needed to read nnU-Net's own checkpoints with ``weights_only=True``.

    nnU-Net stores its training log (``logging``: losses from ``np.mean``, Dice from ``np.nanmean``)
    and ``_best_ema`` as numpy scalars. A numpy scalar pickles as
    ``numpy._core.multiarray.scalar(numpy.dtype(<code>), <raw bytes>)``; allowing exactly that
    function, ``numpy.dtype`` and the plain numeric/bool dtype classes lets these values be rebuilt
    without permitting any other callable (no ndarray reconstruction, no object dtype classes).
    """
    try:
        scalar = np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        scalar = np.core.multiarray.scalar
    allowed = [scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                     "Int16DType", "Int8DType", "UInt8DType", "BoolDType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def load_weights_only(path: str, map_location="cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (through ``training.checkpoint.load_checkpoint``).

    Accepts MACL checkpoints and nnU-Net's own checkpoints (whose numpy scalars are rebuilt under the
    explicit allow-list of :func:`numpy_scalar_safe_globals`). Anything that would need arbitrary
    unpickling raises :class:`~nnunetv2_macl.training.checkpoint.CheckpointError`; nothing in the
    file is executed.
    """
    path = os.fspath(path)
    with torch.serialization.safe_globals(numpy_scalar_safe_globals()):
        return load_checkpoint(path, map_location=map_location)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
@dataclass
class TransferReport:
    """Outcome of :func:`transfer_pretrained_weights`; keys are the network's state_dict keys."""

    source: str = "<dict>"
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    unused_checkpoint_keys: list[str] = field(default_factory=list)
    encoder_loaded: int = 0
    encoder_total: int = 0
    pretrained_prefixes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    #: what to print so that users cite the method (empty for checkpoints that are not MACL's)
    citation: str = ""
    #: the checkpoint's format version (0: not a MACL pretraining checkpoint; 1: before versioning)
    format_version: int = 0

    @property
    def num_total(self) -> int:
        return len(self.loaded) + len(self.skipped)

    def skipped_by_reason(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for k, r in self.skipped.items():
            out.setdefault(_reason_kind(r), []).append(k)
        return out

    def summary(self) -> str:
        by_reason = self.skipped_by_reason()
        counts = ", ".join(f"{len(v)} {k}" for k, v in by_reason.items()) or "none"
        lines = [
            f"MACL weight transfer from {self.source}",
            f"  loaded {len(self.loaded)} of {self.num_total} tensors "
            f"(encoder {self.encoder_loaded}/{self.encoder_total}, "
            f"decoder {sum(1 for k in self.loaded if k.startswith('decoder.'))}); "
            f"adapted {len(self.adapted)}; skipped {len(self.skipped)} ({counts})",
        ]
        if self.pretrained_prefixes is not None:
            lines.append(f"  pretrained prefixes: {', '.join(self.pretrained_prefixes)}")
        for k, how in self.adapted.items():
            lines.append(f"  adapted {k}: {how}")
        for kind, keys in by_reason.items():
            if kind in (REASON_SHAPE, REASON_ROLE):  # per-tensor reasons (role: at most a handful)
                shown = keys[:20]
                for k in shown:
                    lines.append(f"  skipped {k}: {self.skipped[k]}")
                if len(keys) > len(shown):
                    lines.append(f"  ... and {len(keys) - len(shown)} more shape mismatches")
            else:
                lines.append(f"  skipped ({kind}): {_compress_keys(keys)}")
        if self.unused_checkpoint_keys:
            lines.append(f"  {len(self.unused_checkpoint_keys)} checkpoint tensors have no counterpart in the "
                         f"network (skipped, e.g. stages this network lacks): "
                         f"{_compress_keys(self.unused_checkpoint_keys)}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    for kind in (REASON_SHAPE, REASON_MISSING, REASON_NOT_PRETRAINED, REASON_ROLE):
        if reason.startswith(kind):
            return kind
    return reason


def _group_of(key: str) -> str:
    """``decoder.stages.2.convs.0.conv.weight`` -> ``decoder.stages.2`` (module group for compact listings)."""
    parts = key.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 else key


def _compress_keys(keys: Iterable[str]) -> str:
    groups: dict[str, int] = {}
    for k in keys:
        g = _group_of(k)
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g}.* ({n})" if n > 1 or g not in keys else g for g, n in groups.items())


# --------------------------------------------------------------------------------------------------
# transfer
# --------------------------------------------------------------------------------------------------
def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    mod = network
    for _ in range(8):
        if isinstance(mod, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            mod = mod.module
        elif hasattr(mod, "_orig_mod") and isinstance(getattr(mod, "_orig_mod"), nn.Module):
            mod = mod._orig_mod
        else:
            break
    return mod


def _strip_wrapper_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in ("module.", "_orig_mod."):
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _split_checkpoint(checkpoint: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Return (state_dict with wrapper prefixes removed, macl metadata or None)."""
    meta = checkpoint.get("macl") if isinstance(checkpoint.get("macl"), dict) else None
    if isinstance(checkpoint.get("network_weights"), dict):
        raw = checkpoint["network_weights"]
    elif isinstance(checkpoint.get("state_dict"), dict):
        raw = checkpoint["state_dict"]
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raw = checkpoint
    else:
        raise IncompatibleCheckpointError(
            "The checkpoint holds no network weights (expected a 'network_weights' state_dict as written by "
            f"MACL pretraining or nnU-Net; top-level keys: {sorted(map(str, checkpoint))[:10]})")
    weights = {}
    for k, v in raw.items():
        if isinstance(v, torch.Tensor):
            weights[_strip_wrapper_prefixes(str(k))] = v
    return weights, meta


def pretrained_prefixes_from_meta(meta: dict | None) -> list[str] | None:
    """The key prefixes a MACL checkpoint trained; None when the checkpoint has no MACL metadata."""
    if not meta:
        return None
    prefixes = meta.get("pretrained_prefixes")
    if prefixes:
        return [str(p) for p in prefixes]
    if "decoder_blocks" in meta:
        n = int(meta["decoder_blocks"])
        return [ENCODER_PREFIX] + [f"decoder.stages.{i}." for i in range(n)] + \
            [f"decoder.transpconvs.{i}." for i in range(n)]
    return None


def _alias_groups(mod: nn.Module) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """canonical key -> all keys of the same tensor (canonical first), canonical key -> tensor."""
    groups: dict[str, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, t in mod.state_dict(keep_vars=True).items():
        canon = seen.get(id(t))
        if canon is None:
            seen[id(t)] = k
            groups[k] = [k]
            tensors[k] = t
        else:
            groups[canon].append(k)
    return groups, tensors


def _first_conv_key(weights: dict[str, torch.Tensor], in_channels: int | None) -> str | None:
    """First 4-D/5-D encoder weight (in checkpoint order) whose in-channels equal ``in_channels``."""
    for k, v in weights.items():
        if k.startswith(ENCODER_PREFIX) and k.endswith("weight") and v.ndim in (4, 5):
            if in_channels is None or v.shape[1] == in_channels:
                return k
    return None


def adapt_input_channels(weight: torch.Tensor, in_new: int) -> tuple[torch.Tensor, str]:
    """Adapt a first-convolution weight ``[out, in_pre, *k]`` to ``in_new`` input channels.

    Fewer channels: the mean over the pretrained channels, repeated ``in_new`` times. More channels:
    the pretrained channels repeated cyclically, scaled by ``in_pre / in_new`` so that the response to
    an input whose channels are alike keeps its magnitude. (nnU-Net normalises right after this
    convolution, so the scale matters little; the pattern of the filters is what transfers.)
    """
    in_pre = weight.shape[1]
    if in_new < in_pre:
        w = weight.mean(dim=1, keepdim=True).repeat(1, in_new, *([1] * (weight.ndim - 2)))
        how = f"input channels {in_pre} -> {in_new}: mean over the {in_pre} pretrained channels, repeated"
    else:
        idx = torch.arange(in_new) % in_pre
        w = weight[:, idx] * (in_pre / in_new)
        how = (f"input channels {in_pre} -> {in_new}: pretrained channels repeated cyclically, "
               f"scaled by {in_pre}/{in_new}")
    return w, how


def adapt_kernel(weight: torch.Tensor, kernel: tuple[int, ...], transposed: bool = False,
                 shrink: str = "sum") -> tuple[torch.Tensor, str]:
    """Adapt a (transposed-)convolution weight ``[a, b, *k_pre]`` to the spatial kernel size ``kernel``.

    Convolutions, per axis: shrinking to 1 sums the taps along that axis (``shrink="sum"``; the
    response to an input that is constant along the axis is kept; ``"mean"`` differs by a factor
    the instance norm after every nnU-Net convolution removes; ``"centre"`` keeps the central tap);
    shrinking to another odd size keeps the central taps; growing zero-pads the pretrained kernel in
    the centre (its response on each input is unchanged). Transposed convolutions (kernel = stride):
    shrinking to 1 averages the taps, growing from 1 repeats the tap (nearest-neighbour upsampling).
    Raises ``ValueError`` for a change without such a rule (e.g. an even difference of conv sizes).
    """
    if shrink not in ("sum", "mean", "centre"):
        raise ValueError(f"shrink must be 'sum', 'mean' or 'centre', got {shrink!r}")
    w = weight.detach().float()
    pre = tuple(int(k) for k in w.shape[2:])
    if len(pre) != len(kernel):
        raise ValueError(f"kernel {list(pre)} and {list(kernel)} have different dimensionality")
    for axis, (kp, kt) in enumerate(zip(pre, kernel)):
        dim = 2 + axis
        if kp == kt:
            continue
        if transposed:
            if kt == 1:
                w = w.mean(dim=dim, keepdim=True)
            elif kp == 1:
                w = w.repeat_interleave(kt, dim=dim)
            else:
                raise ValueError(f"transposed-convolution kernel {kp} -> {kt} along axis {axis}")
        elif kt < kp:
            if kt == 1 and shrink != "centre":
                w = w.sum(dim=dim, keepdim=True) if shrink == "sum" else w.mean(dim=dim, keepdim=True)
            elif (kp - kt) % 2 == 0:
                w = w.narrow(dim, (kp - kt) // 2, kt)
            else:
                raise ValueError(f"kernel {kp} -> {kt} along axis {axis} (no centred crop)")
        else:
            if (kt - kp) % 2:
                raise ValueError(f"kernel {kp} -> {kt} along axis {axis} (no centred padding)")
            pad = [0, 0] * (w.ndim - 2)
            side = (kt - kp) // 2
            pad[2 * (w.ndim - 1 - dim)] = pad[2 * (w.ndim - 1 - dim) + 1] = side
            w = torch.nn.functional.pad(w, pad)
    rule = ("taps averaged / repeated (transposed convolution)" if transposed else
            {"sum": "summed over shrunk axes, zero-padded around the pretrained kernel on grown axes",
             "mean": "averaged over shrunk axes, zero-padded on grown axes",
             "centre": "central taps kept on shrunk axes, zero-padded on grown axes"}[shrink])
    return w, f"kernel {list(pre)} -> {list(kernel)}: {rule}"


def stage_depth_offset(checkpoint_keys: Iterable[str], network_keys: Iterable[str]) -> int:
    """(encoder stages of the checkpoint) - (encoder stages of the network); 0 when either has none."""
    def depth(keys):
        found = [int(m.group(1)) for k in keys if (m := _ENCODER_STAGE.match(k))]
        return max(found) + 1 if found else 0

    a, b = depth(checkpoint_keys), depth(network_keys)
    return a - b if a and b else 0


def checkpoint_key_for(network_key: str, depth_offset: int) -> str | None:
    """The checkpoint key holding the counterpart of ``network_key``: decoder stages are matched by
    the encoder stage they join (``decoder.stages.j`` <- ``decoder.stages.{j + offset}``); None for a
    decoder stage the checkpoint's (shallower) network does not have."""
    if depth_offset:
        m = _DECODER_STAGE.match(network_key)
        if m:
            j = int(m.group(2)) + depth_offset
            return f"decoder.{m.group(1)}.{j}.{m.group(3)}" if j >= 0 else None
    return network_key


def _upsampled_input(index: int) -> str:
    """What ``decoder.transpconvs.{index}`` of nnU-Net's UNetDecoder reads."""
    return "the bottleneck" if index == 0 else f"a decoder-stage output (decoder.stages.{index - 1})"


def decoder_input_role_change(network_key: str, depth_offset: int) -> str | None:
    """Why the upsampled input of ``network_key``'s decoder stage means something else in the checkpoint.

    Returns None when the two agree, or when the key is not in a decoder stage. Under a depth offset
    the network's ``decoder.{stages,transpconvs}.i`` is matched with the checkpoint's index ``j = i +
    offset`` (the stage that joins the same encoder skip). ``transpconvs.i`` reads the bottleneck when
    ``i == 0`` and the output of ``stages.{i-1}`` otherwise. So the pair reads the same kind of input
    unless exactly one of ``i`` and ``j`` is 0. The upsampled tensor feeds the first half of
    ``stages.i``'s input, so that stage's input convolutions are affected too. Tensors after them in
    the stage read that stage's own features on both sides.
    """
    m = _DECODER_STAGE.match(network_key)
    if not depth_offset or not m:
        return None
    i = int(m.group(2))
    j = i + depth_offset
    if j < 0 or (i == 0) == (j == 0):
        return None
    return (f"decoder.transpconvs.{i} reads {_upsampled_input(i)} here but {_upsampled_input(j)} "
            f"in the checkpoint (decoder.transpconvs.{j})")


def _upsampled_channels(network_tensors: dict[str, torch.Tensor], decoder_key: str) -> int | None:
    """Output channels of the transposed convolution feeding ``decoder_key``'s stage: the leading part of
    that stage's input (ConvTranspose weights are ``[in, out, *k]``); None when the network has none."""
    m = _DECODER_STAGE.match(decoder_key)
    w = network_tensors.get(f"decoder.transpconvs.{m.group(2)}.weight") if m else None
    return int(w.shape[1]) if w is not None and w.ndim >= 3 else None


def _as_strides(strides: object, ndims: list[int]) -> list[tuple[int, ...]] | None:
    """Per-stage strides as tuples (a scalar stride stands for every axis); None when unreadable."""
    if not isinstance(strides, (list, tuple)):
        return None
    out = []
    try:
        for s, stride in enumerate(strides):
            if isinstance(stride, (list, tuple)):
                out.append(tuple(int(x) for x in stride))
            else:
                out.append((int(stride),) * (ndims[s] if s < len(ndims) else 1))
    except (TypeError, ValueError):
        return None
    return out


def network_encoder_strides(mod: nn.Module) -> list[tuple[int, ...]] | None:
    """The strides of the network's encoder stages (``encoder.strides`` of dynamic_network_architectures)."""
    strides = getattr(getattr(mod, "encoder", None), "strides", None)
    return _as_strides(strides, []) if strides is not None else None


def _nnunet_checkpoint_strides(checkpoint: dict) -> object:
    """The strides recorded in an nnU-Net checkpoint (``init_args``: plans and configuration), or None."""
    init = checkpoint.get("init_args")
    if not isinstance(init, dict) or not isinstance(init.get("plans"), dict):
        return None
    configurations = init["plans"].get("configurations") or {}
    conf = configurations.get(init.get("configuration"))
    for _ in range(len(configurations)):  # follow 'inherits_from' (e.g. 3d_cascade_fullres -> 3d_fullres)
        if not isinstance(conf, dict):
            return None
        arch = conf.get("architecture", {}).get("arch_kwargs", {})
        if "strides" in arch:
            return arch["strides"]
        if "pool_op_kernel_sizes" in conf:  # plans written before nnU-Net 2.4
            return conf["pool_op_kernel_sizes"]
        conf = configurations.get(conf.get("inherits_from"))
    return None


def checkpoint_encoder_strides(meta: dict | None, ndims: list[int],
                               checkpoint: dict | None = None) -> list[tuple[int, ...]] | None:
    """The encoder strides of the plan a checkpoint was trained with: MACL's
    ``macl.network_arch_init_kwargs``, else nnU-Net's ``init_args``; None when it does not say
    (plain state dicts)."""
    kwargs = meta.get("network_arch_init_kwargs") if meta else None
    if isinstance(kwargs, dict) and "strides" in kwargs:
        return _as_strides(kwargs["strides"], ndims)
    strides = _nnunet_checkpoint_strides(checkpoint) if checkpoint else None
    return _as_strides(strides, ndims) if strides is not None else None


def stride_change_notes(checkpoint_strides: list[tuple[int, ...]],
                        network_strides: list[tuple[int, ...]]) -> list[str]:
    """One note per encoder stage (matched from the top) whose stride differs between the two plans."""
    notes = []
    for s, (a, b) in enumerate(zip(checkpoint_strides, network_strides)):
        if tuple(a) != tuple(b):
            notes.append(f"encoder stage {s}: stride {list(a)} in the checkpoint's plan, {list(b)} in this network; "
                         f"its weights load unchanged (the same filters, evaluated on another grid)")
    return notes


def _storage_id(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) \
        if t.numel() else (id(t),)


def _adapt(value: torch.Tensor, target: torch.Tensor, is_first_conv: bool,
           transposed: bool) -> tuple[torch.Tensor | None, str]:
    """A checkpoint tensor reshaped to the network's tensor by the rules of :func:`adapt_kernel` and
    :func:`adapt_input_channels`; (None, why not) when no rule applies."""
    if value.ndim != target.ndim or value.ndim not in (4, 5):
        return None, ""
    channel_axis = 0 if transposed else 1  # ConvTranspose weights are [in, out, *k]
    other_axis = 1 - channel_axis
    if value.shape[other_axis] != target.shape[other_axis]:
        return None, ""
    if value.shape[channel_axis] != target.shape[channel_axis] and not (is_first_conv and not transposed):
        return None, ""
    steps = []
    w = value.detach().float()
    if tuple(w.shape[2:]) != tuple(target.shape[2:]):
        try:
            w, how = adapt_kernel(w, tuple(int(k) for k in target.shape[2:]), transposed=transposed)
        except ValueError as e:
            return None, f"no kernel adaptation rule: {e}"
        steps.append(how)
    if w.shape[1] != target.shape[1]:
        w, how = adapt_input_channels(w, int(target.shape[1]))
        steps.append(how)
    return w, "; ".join(steps)


def transfer_pretrained_weights(network: nn.Module, checkpoint: dict | str, min_fraction: float = 0.5,
                                log: Callable[..., object] | None = print, scope: str = "pretrained") -> TransferReport:
    """Copy the pretrained tensors of ``checkpoint`` into ``network`` (in place) and report what happened.

    ``checkpoint``: a path (read with ``weights_only=True``) or an already loaded dict (a MACL or nnU-Net
    checkpoint with ``network_weights``, or a bare state_dict). ``network`` may be wrapped in DDP and/or
    torch.compile. Raises :class:`IncompatibleCheckpointError` (network untouched) when nothing fits or
    fewer than ``min_fraction`` of the encoder's tensors fit; the message names the first mismatched
    keys. ``log`` (e.g. ``trainer.print_to_log_file``) receives the report summary; None to stay quiet.
    ``scope``: ``"pretrained"`` copies every tensor the checkpoint pretrained, ``"encoder"`` only the encoder's
    (:data:`TRANSFER_SCOPES`; the decoder stages then keep the network's initialisation).
    """
    if scope not in TRANSFER_SCOPES:
        raise ValueError(f"transfer scope must be one of {TRANSFER_SCOPES}, got {scope!r}")
    source = "<dict>"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.path.abspath(os.fspath(checkpoint))
        checkpoint = load_weights_only(source)
    if not isinstance(checkpoint, dict):
        raise IncompatibleCheckpointError(f"Expected a checkpoint dict or path, got {type(checkpoint).__name__}")
    try:
        format_version = checkpoint_format_version(checkpoint)
    except UnsupportedCheckpointFormatError as e:
        raise IncompatibleCheckpointError(f"{source}: {e}") from None
    weights, meta = _split_checkpoint(checkpoint)
    mod = unwrap_network(network)
    groups, tensors = _alias_groups(mod)
    prefixes = pretrained_prefixes_from_meta(meta)
    encoder_only = scope == "encoder"

    report = TransferReport(source=source, pretrained_prefixes=prefixes, format_version=format_version,
                            citation=citation_text(checkpoint))
    if meta:
        arch = str(meta.get("network_arch_class_name", ""))
        if arch and arch.split(".")[-1] != type(mod).__name__:
            report.notes.append(f"checkpoint architecture {arch} differs from the network's {type(mod).__name__}")

    # first convolution of the pretrained network (for input-channel adaptation)
    in_pre = None
    if meta and meta.get("input_channels") is not None:
        in_pre = int(meta["input_channels"])
    first_conv = _first_conv_key(weights, in_pre)
    if first_conv is not None and in_pre is None:
        in_pre = int(weights[first_conv].shape[1])

    to_copy: list[tuple[torch.Tensor, torch.Tensor]] = []
    counterparts: set[str] = set()  # checkpoint keys some network tensor maps to
    mismatches: list[str] = []  # human-readable, encoder first
    enc_keys = [c for c, names in groups.items() if any(n.startswith(ENCODER_PREFIX) for n in names)]
    if not enc_keys:  # an architecture without an 'encoder.' submodule: judge on all non-head tensors
        enc_keys = [c for c, names in groups.items() if not any(SEG_LAYER_MARK in n for n in names)]
    enc_set = set(enc_keys)
    offset = stage_depth_offset(weights, (n for names in groups.values() for n in names))
    if offset:
        report.notes.append(
            f"the checkpoint's network has {abs(offset)} encoder stage(s) {'more' if offset > 0 else 'fewer'} than "
            f"this one: encoder stages matched from the top, decoder.stages.j / decoder.transpconvs.j taken from "
            f"the checkpoint's index j{offset:+d} (the stage joining the same encoder stage), except where the "
            f"upsampled input reads the bottleneck on one side and a decoder-stage output on the other")
    by_name = {n: tensors[c] for c, names in groups.items() for n in names}
    kernel_adapted = False  # evidence that the plans differ, for the note on unknown strides

    for canon, names in groups.items():
        mapped = {n: checkpoint_key_for(n, offset) for n in names}
        ck_names = [m for m in mapped.values() if m is not None]
        counterparts.update(ck_names)
        if any(n.startswith(SEG_LAYER_MARK) or ("." + SEG_LAYER_MARK) in n for n in names):
            report.skipped[canon] = REASON_SEG_HEAD
            continue
        if not ck_names:
            report.skipped[canon] = (f"{REASON_MISSING} (a decoder stage the checkpoint's shallower network lacks; "
                                     f"kept at initialisation)")
            continue
        if prefixes is not None and not any(m.startswith(p) for m in ck_names for p in prefixes):
            report.skipped[canon] = f"{REASON_NOT_PRETRAINED} (outside the checkpoint's pretrained prefixes)"
            continue
        if encoder_only and not any(n.startswith(ENCODER_PREFIX) for n in names):
            report.skipped[canon] = f"{REASON_NOT_PRETRAINED} (encoder-only transfer: kept at initialisation)"
            continue
        ck = next((m for m in ck_names if m in weights), None)
        target = tensors[canon]
        if ck is None:
            report.skipped[canon] = REASON_MISSING
            mismatches.append(f"{canon} (missing in checkpoint)")
            continue
        value = weights[ck]
        renamed = f" (from {ck})" if ck not in names else ""
        decoder_name = next((n for n in names if _DECODER_STAGE.match(n)), None)
        role_change = decoder_input_role_change(decoder_name, offset) if decoder_name else None
        if role_change and "transpconvs." in decoder_name:
            # equal shapes, other meaning: a filter trained on decoder features would be applied to the
            # bottleneck (or the reverse), so the network's initialisation is the honest starting point
            report.skipped[canon] = f"{REASON_ROLE}: {role_change}; kept at initialisation"
            continue
        how = "taken"
        if tuple(value.shape) != tuple(target.shape):
            adapted, how = _adapt(value, target, is_first_conv=ck == first_conv, transposed="transpconvs." in ck)
            if adapted is None:
                report.skipped[canon] = (f"{REASON_SHAPE} (checkpoint {list(value.shape)} vs network "
                                         f"{list(target.shape)}{'; ' + how if how else ''})")
                mismatches.append(f"{canon} (checkpoint {list(value.shape)} vs network {list(target.shape)})")
                continue
            kernel_adapted |= tuple(value.shape[2:]) != tuple(target.shape[2:])
            value = adapted
        skip_channels = _upsampled_channels(by_name, decoder_name) if role_change else None
        if skip_channels is not None and value.ndim >= 3 and target.shape[1] == 2 * skip_channels:
            # a convolution reading the stage input [upsampled features, encoder skip] (UNetDecoder's
            # concatenation order): the skip half reads the same encoder stage on both sides and loads;
            # the upsampled half keeps its initialisation. The output channels keep their pretrained
            # identity (each still applies its pretrained filter to the skip), so the stage's later
            # tensors read the same features they were trained on and load as they are.
            kept = target.detach()[:, :skip_channels].to(device=value.device, dtype=value.dtype)
            value = torch.cat([kept, value[:, skip_channels:]], 1)
            upsampler = decoder_name.split(".")[2]
            how = (f"{'' if how == 'taken' else how + '; '}input channels {skip_channels}..{2 * skip_channels - 1} "
                   f"(the encoder skip) taken, channels 0..{skip_channels - 1} (the output of "
                   f"decoder.transpconvs.{upsampler}) kept at initialisation ({REASON_ROLE}: {role_change})")
        to_copy.append((target, value))
        report.loaded.append(canon)
        if how != "taken" or renamed:
            report.adapted[canon] = how + renamed

    # a checkpoint tensor saved under several alias keys (shared storage) is listed once
    covered = {_storage_id(weights[k]) for k in counterparts if k in weights}
    seen_unused: set = set()
    for k, v in weights.items():
        sid = _storage_id(v)
        if k not in counterparts and sid not in covered and sid not in seen_unused:
            seen_unused.add(sid)
            report.unused_checkpoint_keys.append(k)
    report.encoder_total = len(enc_keys)
    net_strides = network_encoder_strides(mod)
    ck_strides = checkpoint_encoder_strides(meta, [len(s) for s in net_strides or []], checkpoint)
    if ck_strides is not None and net_strides is not None:
        # A stride only chooses where a filter is evaluated: the loaded kernel still computes the
        # response it learned, on a coarser or finer grid. The deeper stages then see another scale,
        # and fine-tuning adjusts to that. So the stage loads, and the note makes the change visible.
        report.notes.extend(stride_change_notes(ck_strides, net_strides))
    elif net_strides is not None and (offset or kernel_adapted):
        report.notes.append("the checkpoint does not record its plan's strides (neither macl.network_arch_init_kwargs "
                            "nor nnU-Net's init_args): encoder strides could not be compared with this network's")
    if encoder_only:
        report.notes.append("encoder-only transfer: the checkpoint's decoder stages are not used")
    report.encoder_loaded = sum(1 for k in report.loaded if k in enc_set)

    frac = report.encoder_loaded / max(1, report.encoder_total)
    if not report.loaded or frac < min_fraction:
        enc_first = sorted(mismatches, key=lambda s: 0 if s.split(" ")[0] in enc_set else 1)
        shown = "; ".join(enc_first[:5]) or "none"
        extra = (f" Checkpoint keys absent from the network include: "
                 f"{', '.join(report.unused_checkpoint_keys[:5])}." if report.unused_checkpoint_keys else "")
        arch = f" ({report.notes[0]})" if report.notes else ""
        raise IncompatibleCheckpointError(
            f"Pretrained checkpoint {source} does not fit the network{arch}: only {report.encoder_loaded} of "
            f"{report.encoder_total} encoder tensors ({frac:.0%}; required {min_fraction:.0%}) and "
            f"{len(report.loaded)} tensors in total match by name and shape (after kernel-size and stage "
            f"adaptation). First mismatched keys: {shown}.{extra} Pretrain with the same architecture class and "
            f"feature widths (for another dataset: nnUNetv2_move_plans_between_datasets) or choose another "
            f"checkpoint. Refusing to continue instead of silently training from scratch.")

    with torch.no_grad():
        for target, value in to_copy:
            target.copy_(value.to(device=target.device, dtype=target.dtype))

    if log is not None:
        log(report.summary())
    return report


# --------------------------------------------------------------------------------------------------
# nnU-Net's -pretrained_weights, made safe and lenient
# --------------------------------------------------------------------------------------------------
PRETRAINED_SOURCE_ATTR = "_macl_pretrained_weights_source"
PRETRAINED_REPORT_ATTR = "_macl_pretrained_weights_report"
# set on the network by nnUNetTrainerMACL: the hand-over (TRANSFER_SCOPES) that -pretrained_weights follows too
TRANSFER_SCOPE_ATTR = "_macl_transfer_scope"


def safe_load_pretrained_weights(network: nn.Module, fname: str, verbose: bool = False) -> TransferReport:
    """Drop-in replacement for ``nnunetv2.run.load_pretrained_weights.load_pretrained_weights``.

    Same signature. Differences: the file is read with ``weights_only=True`` (nnU-Net's version calls
    ``torch.load(weights_only=False)``, i.e. unpickles arbitrary objects, which can execute code from
    the file), and partial checkpoints (e.g. a MACL encoder + decoder-stage checkpoint) load the
    matching tensors instead of failing an assertion on the first absent key; too little overlap
    still fails loudly (:class:`IncompatibleCheckpointError`). The source and report are recorded on
    the (unwrapped) network so that nnUNetTrainerMACL knows weights were given explicitly. A network built by
    nnUNetTrainerMACL carries its transfer scope (``TRANSFER_SCOPE_ATTR``), so the flag hands over what the
    trainer's own lookup would; any other trainer's network takes every fitting tensor, as nnU-Net does.
    """
    mod = unwrap_network(network)
    report = transfer_pretrained_weights(network, fname, log=print,
                                         scope=getattr(mod, TRANSFER_SCOPE_ATTR, "pretrained"))
    setattr(mod, PRETRAINED_SOURCE_ATTR, report.source)
    setattr(mod, PRETRAINED_REPORT_ATTR, report)
    if verbose:
        print("Loaded tensors: " + _compress_keys(report.loaded))
    return report


def install_safe_nnunet_pretrained_loader() -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` use :func:`safe_load_pretrained_weights`.

    ``nnunetv2.run.run_training`` binds ``load_pretrained_weights`` at import
    (``from nnunetv2.run.load_pretrained_weights import load_pretrained_weights``) and
    ``maybe_load_checkpoint`` calls that module attribute *after* the trainer class was looked up,
    so replacing it when the MACL trainer module is imported takes effect for the same run.
    The source module's attribute is replaced too, for code that imports it later. Idempotent.
    """
    import nnunetv2.run.load_pretrained_weights as lpw
    import nnunetv2.run.run_training as rt

    rt.load_pretrained_weights = safe_load_pretrained_weights
    lpw.load_pretrained_weights = safe_load_pretrained_weights


__all__ = [
    "CheckpointError", "IncompatibleCheckpointError", "TRANSFER_SCOPE_ATTR", "TransferReport", "adapt_input_channels",
    "adapt_kernel", "checkpoint_encoder_strides", "checkpoint_key_for", "decoder_input_role_change",
    "network_encoder_strides", "stage_depth_offset", "stride_change_notes",
    "install_safe_nnunet_pretrained_loader", "load_weights_only", "numpy_scalar_safe_globals",
    "pretrained_prefixes_from_meta", "safe_load_pretrained_weights", "transfer_pretrained_weights",
    "unwrap_network",
]

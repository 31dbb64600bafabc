"""A CPU-sized 2-D configuration beside nnU-Net's native one, in the same plans file.

nnU-Net plans the 2-D network for a GPU: on MSD Heart that is 256 x 256 at 1.25 mm, batch 49, 7 stages,
far out of reach of a few CPU cores. :func:`add_cpu_configuration` adds a configuration (default
``2d_cpu``) that inherits everything from the native one (normalisation, resampling, batch Dice,
preprocessor) except what sets the cost: a coarser in-plane spacing, a fixed patch and a fixed batch.
The network topology for that patch (stages, strides, kernel sizes, features per stage) is planned by
the experiment planner that wrote the plans, through its own ``get_plans_for_configuration``, so the
network is exactly what nnU-Net would plan for that spacing and patch. The configuration gets its own
``data_identifier``, so stock tools work unchanged::

    macl_cpu_plan -d 505                       # adds 2d_cpu: 2.5 mm, 128 x 128, batch 16
    nnUNetv2_preprocess -d 505 -c 2d_cpu
    nnUNetv2_train 505 2d_cpu 0
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_macl.errors import UsageError


class CpuPlanError(UsageError):
    """The CPU configuration cannot be added; the message says why and what to do."""


DEFAULT_NAME = "2d_cpu"
DEFAULT_SPACING_MM = 2.5
DEFAULT_PATCH = (128, 128)
DEFAULT_BATCH = 16
# Keys that inherits_from does not take from the base: the rest (normalisation, resampling, batch_dice,
# preprocessor) stays the native configuration's, so the two differ only in cost.
OWN_KEYS = ("data_identifier", "spacing", "patch_size", "batch_size", "median_image_size_in_voxels", "architecture")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


def _pair(value: float | int | Sequence[float | int], what: str) -> tuple[float, ...]:
    vals = (value,) * 2 if isinstance(value, (int, float)) else tuple(value)
    if len(vals) != 2:
        raise CpuPlanError(f"{what} needs 1 or 2 values (in-plane), got {list(vals)}")
    return vals


def plans_file_of(dataset: int | str, plans_identifier: str = "nnUNetPlans") -> tuple[str, Path]:
    """(dataset name, path of its plans file) under ``$nnUNet_preprocessed``, with errors a user can act on."""
    if not os.environ.get("nnUNet_preprocessed"):
        raise CpuPlanError("nnUNet_preprocessed is not set; export it as for nnUNetv2_plan_and_preprocess")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:  # nnU-Net raises RuntimeError for an unknown id
        raise CpuPlanError(f"unknown dataset {dataset!r}: {' '.join(str(e).split())}") from None
    plans_file = Path(os.environ["nnUNet_preprocessed"]) / name / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise CpuPlanError(f"{plans_file} does not exist: plan the dataset first "
                           f"(nnUNetv2_plan_and_preprocess -d {dataset} -c 2d, or --no_pp)")
    return name, plans_file


def _planner_for(plans: dict, dataset_name: str, plans_identifier: str):
    """The experiment planner class that wrote these plans, instantiated for the dataset."""
    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    planner_name = plans.get("experiment_planner_used", "ExperimentPlanner")
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), planner_name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None or not issubclass(cls, ExperimentPlanner):
        raise CpuPlanError(f"the plans were written by {planner_name!r}, which nnU-Net cannot find; the CPU "
                           f"configuration is planned by the same planner so that the networks match")
    raw = os.environ.get("nnUNet_raw")
    if not raw or not (Path(raw) / dataset_name / "dataset.json").is_file():
        raise CpuPlanError(f"the raw dataset {dataset_name} is not in nnUNet_raw={raw!r}; nnU-Net's planner "
                           f"(and nnUNetv2_preprocess after it) reads it")
    return cls(dataset_name, plans_name=plans_identifier)


def _median_shape_at(fingerprint: dict, transpose_forward: Sequence[int], spacing: Sequence[float]) -> list[float]:
    """Median in-plane image size after resampling every case to ``spacing`` (its slice spacing kept, as
    nnU-Net's 2-D preprocessing does)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    shapes = []
    for shape, sp in zip(fingerprint["shapes_after_crop"], fingerprint["spacings"]):
        shape_t = [shape[i] for i in transpose_forward]
        sp_t = [sp[i] for i in transpose_forward]
        shapes.append(compute_new_shape(shape_t, sp_t, [sp_t[0], *spacing])[1:])
    return [float(v) for v in np.median(np.array(shapes, dtype=np.float64), 0)]


def plan_cpu_configuration(dataset: int | str, in_plane_spacing: float | Sequence[float] = DEFAULT_SPACING_MM,
                           patch_size: int | Sequence[int] = DEFAULT_PATCH, batch_size: int = DEFAULT_BATCH,
                           name: str = DEFAULT_NAME, base_configuration: str = "2d",
                           plans_identifier: str = "nnUNetPlans", overwrite: bool = False,
                           max_stages: int | None = None) -> tuple[Path, dict, dict]:
    """Plan the configuration without writing it: ``(plans file, plans with it added, the new entry)``.

    ``max_stages`` caps the depth nnU-Net plans for the patch (its deepest stages dropped). MACL's
    dominant branch sees the input at 1/k (k = 4 for N = 2) and needs a bottleneck of more than one cell,
    so its crop must hold 2 x k x the total stride: a 128 x 128 patch with nnU-Net's 6 stages (stride 32)
    makes a 256 x 128 crop, half padding; 5 stages make it 128 x 128."""
    spacing = tuple(float(s) for s in _pair(in_plane_spacing, "in-plane spacing"))
    patch = tuple(int(p) for p in _pair(patch_size, "patch size"))
    if min(spacing) <= 0:
        raise CpuPlanError(f"in-plane spacing must be > 0 mm, got {list(spacing)}")
    if min(patch) < 8:
        raise CpuPlanError(f"patch size must be at least 8 per axis, got {list(patch)}")
    if int(batch_size) < 1:
        raise CpuPlanError(f"batch size must be >= 1, got {batch_size}")
    if max_stages is not None and int(max_stages) < 2:
        raise CpuPlanError(f"max stages must be >= 2 (an encoder stage and a bottleneck), got {max_stages}")
    if not _NAME.fullmatch(name) or "__" in name:
        # nnU-Net joins trainer, plans and configuration with '__' in its results folders
        raise CpuPlanError(f"configuration name {name!r}: use letters, digits, '_' and '-', without '__'")

    dataset_name, plans_file = plans_file_of(dataset, plans_identifier)
    plans = json.loads(plans_file.read_text())
    configurations = plans.get("configurations", {})
    if name in configurations and not overwrite:
        raise CpuPlanError(f"configuration {name!r} already exists in {plans_file} (--overwrite replaces it; "
                           f"then rerun nnUNetv2_preprocess -c {name})")
    if name == base_configuration:
        raise CpuPlanError(f"the new configuration cannot replace its base {base_configuration!r}")
    if base_configuration not in configurations:
        raise CpuPlanError(f"the plans have no {base_configuration!r} configuration to start from "
                           f"(they have {sorted(configurations)})")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = PlansManager(plans).get_configuration(base_configuration).configuration  # inheritance resolved
    if len(base["spacing"]) != 2:
        raise CpuPlanError(f"{base_configuration!r} is a {len(base['spacing'])}-D configuration; only 2-D "
                           f"configurations are supported (use -b 2d)")

    planner = _planner_for(plans, dataset_name, plans_identifier)
    data_identifier = planner.generate_data_identifier(name)
    for other, cfg in configurations.items():
        if other != name and cfg.get("data_identifier") == data_identifier:
            raise CpuPlanError(f"configuration {other!r} already stores its data as {data_identifier!r}")
    # The planner shrinks the patch until its GPU-memory estimate fits; a fixed patch must not shrink, so
    # the memory target is lifted, and the median shape passed is the patch (the planner starts from it).
    planner.UNet_vram_target_GB = 1e9
    median = _median_shape_at(planner.dataset_fingerprint, plans["transpose_forward"], spacing)
    n_voxels = float(np.prod(median)) * len(planner.dataset_fingerprint["spacings"])
    planned = planner.get_plans_for_configuration(np.array(spacing), np.array(patch), data_identifier, n_voxels, {})
    got = tuple(int(p) for p in planned["patch_size"])
    if got != patch:
        strides = np.prod(np.array(planned["architecture"]["arch_kwargs"]["strides"]), 0)
        lower = [int(p // s * s) for p, s in zip(patch, strides)]
        raise CpuPlanError(f"patch {list(patch)} does not fit the network nnU-Net plans for it (each axis must "
                           f"be a multiple of {[int(s) for s in strides]}); use {lower} or {list(got)}")
    if max_stages is not None:
        cap_stages(planned["architecture"]["arch_kwargs"], int(max_stages))
    entry = {"inherits_from": base_configuration, "data_identifier": data_identifier,
             "spacing": list(spacing), "patch_size": list(patch), "batch_size": int(batch_size),
             "median_image_size_in_voxels": median, "architecture": planned["architecture"]}
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    recursive_fix_for_json_export(entry)  # numpy scalars -> plain numbers, as the planner saves them
    entry = json.loads(json.dumps(entry))  # tuples -> lists: the entry in memory is what the file holds
    new_plans = dict(plans, configurations={**configurations, name: entry})
    return plans_file, new_plans, entry


def cap_stages(arch_kwargs: dict, max_stages: int) -> None:
    """Drop the deepest stages of a planned architecture beyond ``max_stages`` (in place): every per-stage
    list (features, kernels, strides, convolutions or blocks per stage) loses its last entries, the
    decoder's per-stage lists (one fewer entry) with them."""
    n = int(arch_kwargs["n_stages"])
    if max_stages >= n:
        return
    for key, value in list(arch_kwargs.items()):
        if isinstance(value, (list, tuple)) and len(value) == n:
            arch_kwargs[key] = list(value)[:max_stages]
        elif isinstance(value, (list, tuple)) and len(value) == n - 1 and key.endswith("_decoder"):
            arch_kwargs[key] = list(value)[:max_stages - 1]
    arch_kwargs["n_stages"] = max_stages


def add_cpu_configuration(dataset: int | str, in_plane_spacing: float | Sequence[float] = DEFAULT_SPACING_MM,
                          patch_size: int | Sequence[int] = DEFAULT_PATCH, batch_size: int = DEFAULT_BATCH,
                          name: str = DEFAULT_NAME, base_configuration: str = "2d",
                          plans_identifier: str = "nnUNetPlans", overwrite: bool = False,
                          max_stages: int | None = None) -> dict:
    """Add the configuration ``name`` to the dataset's plans file and return its resolved settings.

    ``in_plane_spacing`` (mm) and ``patch_size`` take one value for both in-plane axes or two (in the
    plans' transposed axis order). Raises :class:`CpuPlanError` for an unknown dataset, missing plans,
    an existing configuration (unless ``overwrite``), a 3-D base configuration, or a patch the planned
    network cannot take.
    """
    plans_file, plans, _ = plan_cpu_configuration(dataset, in_plane_spacing, patch_size, batch_size, name,
                                                  base_configuration, plans_identifier, overwrite, max_stages)
    tmp = plans_file.with_name(plans_file.name + ".tmp")
    tmp.write_text(json.dumps(plans, indent=4))
    os.replace(tmp, plans_file)  # a reader never sees a half-written plans file
    return describe_configuration(plans, name)


def describe_configuration(plans: dict, name: str) -> dict:
    """The settings that decide a configuration's cost, inheritance resolved."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cfg = PlansManager(plans).get_configuration(name).configuration
    arch = cfg["architecture"]["arch_kwargs"]
    return {"configuration": name, "inherits_from": plans["configurations"][name].get("inherits_from"),
            "data_identifier": cfg["data_identifier"], "spacing": list(cfg["spacing"]),
            "patch_size": list(cfg["patch_size"]), "batch_size": int(cfg["batch_size"]),
            "median_image_size_in_voxels": list(cfg["median_image_size_in_voxels"]),
            "n_stages": int(arch["n_stages"]), "features_per_stage": list(arch["features_per_stage"]),
            "strides": [list(s) for s in arch["strides"]]}

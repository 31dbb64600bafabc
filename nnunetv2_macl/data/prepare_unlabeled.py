"""A folder of unlabeled scans -> an nnU-Net v2 raw dataset that nnU-Net can plan and preprocess and
``macl_pretrain`` can pretrain on.

nnU-Net needs a label file per case: its dataset check refuses cases without one, and its CT
normalisation (``CTNormalization``) clips and scales with intensity statistics that the fingerprint
extractor takes from the *foreground* (label > 0) voxels. An all-zero label would leave those
statistics empty. So every case gets a mask that stands in for the foreground:

* CT: a body mask -- voxels above ``ct_threshold`` (default -500 HU), the largest 3-D connected
  component (removes the table, cables, noise), holes filled per axial slice (ITK's third axis, the
  slice axis of DICOM series) so the lungs and bowel gas count as body. Labels
  ``{"background": 0, "body": 1}``. nnU-Net's CT normalisation then takes its percentiles, mean
  and std from the body instead of from nothing (or from the air).
* MRI: the non-background -- an Otsu threshold, holes filled per slice. Labels
  ``{"background": 0, "foreground": 1}``. (nnU-Net z-scores MRI per image; the mask only has to
  satisfy nnU-Net.)

The masks are never used by MACL pretraining (it reads image data only) and are not a segmentation
target: do not train a segmentation model on them.

Inputs: every NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) and MetaImage
(``.mha``, ``.mhd``) file below the folder, and every DICOM series (found with GDCM, one case per
series, also several series in one directory), read with SimpleITK. Each must be a single-channel
3-D volume: multi-channel inputs (several modalities per case, RGB/vector pixels, 4-D files) are out
of scope. Outputs: ``imagesTr/NAME_XXX_0000.nii.gz``, ``labelsTr/NAME_XXX.nii.gz``,
``dataset.json`` and ``macl_sources.json`` (case -> source) in ``$nnUNet_raw/DatasetXXX_NAME``. The
dataset is written to a hidden temporary folder first and renamed when every case succeeded, so a
failed run leaves nothing behind.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from nnunetv2_macl.data.slice_dataset import DatasetError
from nnunetv2_macl.errors import UnlabeledDataError

MODALITIES = ("CT", "MRI")
LABELS = {"CT": {"background": 0, "body": 1}, "MRI": {"background": 0, "foreground": 1}}
FILE_ENDING = ".nii.gz"
SINGLE_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_ENDINGS = (".dcm", ".dicom", ".ima")
# data files that belong to a header (.mhd/.nhdr) and are read through it
COMPANION_ENDINGS = (".raw", ".zraw", ".raw.gz")
DEFAULT_CT_THRESHOLD = -500.0
SOURCES_FILE = "macl_sources.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class ImageSource:
    """One input volume: a single file or the ordered files of one DICOM series."""
    kind: str  # "file" or "dicom"
    paths: list[str]
    label: str  # what the user is shown: the relative path (a series: its directory and series UID)


@dataclass
class CaseResult:
    case: str
    source: str
    shape: list[int]  # ITK order (x, y, z)
    spacing: list[float]
    mask_fraction: float
    intensity_range: list[float]
    warnings: list[str] = field(default_factory=list)


@dataclass
class PreparedDataset:
    folder: str
    dataset_name: str
    modality: str
    cases: list[CaseResult]
    ignored_files: list[str]
    seconds: float

    @property
    def warnings(self) -> list[str]:
        return [w for c in self.cases for w in c.warnings]


# ----------------------------------------------------------------------------------------- discovery
def _ending(name: str, endings: Sequence[str]) -> str | None:
    low = name.lower()
    return next((e for e in endings if low.endswith(e)), None)


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    # ITK messages start with a file:line location; keep the description
    m = re.search(r"(?:itk::ERROR|Description):\s*(.*)", str(e))
    return (m.group(1).strip() if m else text)[:300]


def find_image_sources(folder: str) -> tuple[list[ImageSource], list[str]]:
    """All image volumes below ``folder`` (sorted by relative path) and the files that were ignored.

    Raises :class:`UnlabeledDataError` for a missing/empty folder, a folder without any image, and a
    DICOM-named file (``.dcm``/``.ima``/``.dicom``) that is part of no readable series.
    """
    import SimpleITK as sitk

    if not os.path.isdir(folder):
        raise UnlabeledDataError(f"Input folder does not exist or is not a directory: {folder}")
    sources: list[ImageSource] = []
    ignored: list[str] = []
    unreadable_dicom: list[str] = []
    any_file = False
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files = sorted(f for f in files if not f.startswith("."))
        if not files:
            continue
        any_file = True
        rel_root = os.path.relpath(root, folder)
        rel = (lambda f: f if rel_root == "." else os.path.join(rel_root, f))
        in_series: set[str] = set()
        candidates = [f for f in files if _ending(f, SINGLE_FILE_ENDINGS + COMPANION_ENDINGS) is None]
        series_ids: Sequence[str] = ()
        if candidates:  # GDCM only needs to look where non-NIfTI/NRRD files are
            shown = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" for non-DICOM folders
            try:
                series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(root) or ()
            finally:
                sitk.ProcessObject.SetGlobalWarningDisplay(shown)
            for uid in series_ids:
                names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid))
                if not names:
                    continue
                in_series.update(os.path.basename(n) for n in names)
                label = f"{rel_root if rel_root != '.' else '.'}{os.sep} (DICOM series {uid}, {len(names)} files)"
                sources.append(ImageSource("dicom", names, label))
        for f in files:
            if f in in_series:
                continue
            if _ending(f, SINGLE_FILE_ENDINGS):
                sources.append(ImageSource("file", [os.path.join(root, f)], rel(f)))
            elif _ending(f, DICOM_ENDINGS):
                unreadable_dicom.append(rel(f))
            elif not _ending(f, COMPANION_ENDINGS):
                ignored.append(rel(f))
    if unreadable_dicom:
        shown = ", ".join(unreadable_dicom[:5]) + (f" and {len(unreadable_dicom) - 5} more"
                                                    if len(unreadable_dicom) > 5 else "")
        raise UnlabeledDataError(f"Unreadable DICOM file(s) in {folder}: {shown} (not part of any DICOM series "
                                 f"GDCM can read). Remove or repair them.")
    if not sources:
        if not any_file:
            raise UnlabeledDataError(f"Input folder is empty: {folder}")
        shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        raise UnlabeledDataError(
            f"No images found in {folder}: expected NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage "
            f"(.mha/.mhd) files or DICOM series; found only: {shown}")
    sources.sort(key=lambda s: s.label)
    return sources, ignored


# ----------------------------------------------------------------------------------------- reading
def read_volume(source: ImageSource):
    """Read one source with SimpleITK and check it is a single-channel 3-D volume."""
    import SimpleITK as sitk

    try:
        if source.kind == "dicom":
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(source.paths))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(source.paths[0])
    except RuntimeError as e:
        raise UnlabeledDataError(f"Cannot read {source.label}: {_first_line(e)}") from None
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise UnlabeledDataError(
            f"{source.label} has {components} components per voxel (RGB/vector image). Only single-channel "
            f"volumes are supported; multi-channel inputs are out of scope for macl_prepare_unlabeled.")
    dim = image.GetDimension()
    if dim == 4:
        raise UnlabeledDataError(
            f"{source.label} is 4-D (size {list(image.GetSize())}): time series or channels stacked along a 4th "
            f"axis are out of scope; give one single-channel 3-D volume per file.")
    if dim != 3:
        raise UnlabeledDataError(f"{source.label} is {dim}-D (size {list(image.GetSize())}); volumes (3-D) are "
                                 f"needed for position-based pretraining.")
    if min(image.GetSize()) < 2:
        raise UnlabeledDataError(f"{source.label} has a single slice (size {list(image.GetSize())}); volumes with "
                                 f"at least 2 voxels along every axis are needed.")
    return image


# ----------------------------------------------------------------------------------------- masks
def _fill_holes_per_slice(mask):
    """Binary hole filling in every slice along ITK's third axis (axial for DICOM/most CT)."""
    import SimpleITK as sitk

    size = mask.GetSize()
    slices = [sitk.BinaryFillhole(mask[:, :, z], fullyConnected=False, foregroundValue=1) for z in range(size[2])]
    filled = sitk.JoinSeries(slices)
    filled = sitk.Cast(filled, sitk.sitkUInt8)
    filled.CopyInformation(mask)
    return filled


def ct_body_mask(image, threshold: float = DEFAULT_CT_THRESHOLD):
    """Body mask of a CT in HU: ``> threshold``, largest connected component, holes filled per slice (uint8 0/1)."""
    import SimpleITK as sitk

    above = sitk.Greater(sitk.Cast(image, sitk.sitkFloat32), float(threshold), 0, 1)
    components = sitk.ConnectedComponent(above, False)
    largest = sitk.Equal(sitk.RelabelComponent(components, 0, True), 1)  # label 1 = largest after sorting
    largest = sitk.Cast(largest, sitk.sitkUInt8)
    largest.CopyInformation(image)
    return _fill_holes_per_slice(largest)


def mri_foreground_mask(image):
    """Non-background of an MRI: Otsu threshold, holes filled per slice (uint8 0/1)."""
    import SimpleITK as sitk

    mask = sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1)  # above the threshold -> 1
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    mask.CopyInformation(image)
    return _fill_holes_per_slice(mask)


# ----------------------------------------------------------------------------------------- one case
def convert_case(source: ImageSource, case: str, images_dir: str, labels_dir: str, modality: str,
                 ct_threshold: float = DEFAULT_CT_THRESHOLD, sitk_threads: int | None = None) -> CaseResult:
    """Read ``source``, write ``images_dir/case_0000.nii.gz`` and its mask ``labels_dir/case.nii.gz``."""
    import SimpleITK as sitk

    if sitk_threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(sitk_threads))
    image = read_volume(source)
    if image.GetPixelID() in (sitk.sitkFloat64,):
        image = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(image)
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UnlabeledDataError(f"{source.label} contains NaN or infinite values")
    warnings = []
    if modality == "CT":
        mask = ct_body_mask(image, ct_threshold)
        if lo > ct_threshold:
            warnings.append(f"{source.label}: no voxel at or below {ct_threshold:g} (minimum {lo:g}); is this CT in "
                            f"Hounsfield units? The body mask is then the whole volume.")
    else:
        mask = mri_foreground_mask(image)
    m = sitk.GetArrayViewFromImage(mask)
    fraction = float(m.mean())
    if fraction == 0.0:
        hint = (f"no voxel above {ct_threshold:g} HU: is this CT in Hounsfield units? (for MRI use --modality MRI)"
                if modality == "CT" else "the image seems to be constant")
        raise UnlabeledDataError(f"{source.label}: the {'body' if modality == 'CT' else 'foreground'} mask is empty "
                                 f"({hint}; intensities {lo:g} .. {hi:g})")
    try:
        sitk.WriteImage(image, os.path.join(images_dir, f"{case}_0000{FILE_ENDING}"), True)
        sitk.WriteImage(mask, os.path.join(labels_dir, f"{case}{FILE_ENDING}"), True)
    except RuntimeError as e:
        raise UnlabeledDataError(f"Cannot write case {case} (from {source.label}): {_first_line(e)}") from None
    return CaseResult(case, source.label, [int(s) for s in image.GetSize()], [float(s) for s in image.GetSpacing()],
                      fraction, [lo, hi], warnings)


def _convert_star(args):
    return convert_case(*args)


# ----------------------------------------------------------------------------------------- the dataset
def _check_target(dataset_id: int, name: str, raw_root: str | None) -> tuple[str, str]:
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise UnlabeledDataError(f"Dataset id must be an integer in 1..999, got {dataset_id!r}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UnlabeledDataError(f"Dataset name must be letters, digits, '_' or '-' (no spaces or path separators), "
                                 f"starting with a letter or digit; got {name!r}")
    if raw_root is None:
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root:
            raise UnlabeledDataError("Environment variable nnUNet_raw is not set (set nnUNet_raw, "
                                     "nnUNet_preprocessed and nnUNet_results as for nnU-Net)")
    dataset_name = f"Dataset{int(dataset_id):03d}_{name}"
    prefix = f"Dataset{int(dataset_id):03d}_"
    existing = []
    roots = [raw_root] + [os.environ.get(v) for v in ("nnUNet_preprocessed", "nnUNet_results")]
    for root in roots:
        if root and os.path.isdir(root):
            existing += [os.path.join(root, d) for d in sorted(os.listdir(root))
                         if d.startswith(prefix) and os.path.isdir(os.path.join(root, d))]
    if existing:
        raise UnlabeledDataError(
            f"Dataset id {int(dataset_id)} already exists: {', '.join(existing)}. Choose another id with -d "
            f"(nnU-Net needs ids to be unique across nnUNet_raw, nnUNet_preprocessed and nnUNet_results).")
    return raw_root, dataset_name


def prepare_unlabeled_dataset(input_folder: str, dataset_id: int, name: str, modality: str = "CT",
                              num_processes: int | None = None, ct_threshold: float = DEFAULT_CT_THRESHOLD,
                              raw_root: str | None = None,
                              log: Callable[[str], object] | None = print) -> PreparedDataset:
    """Convert the images below ``input_folder`` into ``<raw_root>/DatasetXXX_NAME`` (see module doc).

    ``raw_root`` defaults to ``$nnUNet_raw``. ``num_processes`` defaults to nnU-Net's
    ``nnUNet_def_n_proc``. Raises :class:`UnlabeledDataError` (nothing written) for an empty folder, an
    unreadable or unsupported file (named), an empty mask, or an existing dataset id.
    """
    t0 = time.perf_counter()
    modality = str(modality).upper()
    if modality == "MR":
        modality = "MRI"
    if modality not in MODALITIES:
        raise UnlabeledDataError(f"modality must be one of {MODALITIES}, got {modality!r}")
    raw_root, dataset_name = _check_target(dataset_id, name, raw_root)
    input_folder = os.path.abspath(input_folder)
    sources, ignored = find_image_sources(input_folder)
    if num_processes is None:
        num_processes = int(os.environ.get("nnUNet_def_n_proc", 4))
    num_processes = max(1, min(int(num_processes), len(sources)))
    width = max(3, len(str(len(sources) - 1)))
    cases = [f"{name}_{i:0{width}d}" for i in range(len(sources))]
    if log:
        log(f"Found {len(sources)} volume(s) in {input_folder}"
            + (f" ({len(ignored)} other file(s) ignored)" if ignored else "")
            + f"; writing {dataset_name} ({modality})")

    final = os.path.join(raw_root, dataset_name)
    tmp = os.path.join(raw_root, f".{dataset_name}.partial-{os.getpid()}")
    images_dir, labels_dir = os.path.join(tmp, "imagesTr"), os.path.join(tmp, "labelsTr")
    os.makedirs(images_dir)
    os.makedirs(labels_dir)
    try:
        jobs = [(s, c, images_dir, labels_dir, modality, ct_threshold, 1 if num_processes > 1 else None)
                for s, c in zip(sources, cases)]
        if num_processes == 1:
            results = [_convert_star(j) for j in jobs]
        else:
            with ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_convert_star, jobs))
        dataset_json = {
            "name": name,
            "description": (f"Unlabeled {modality} volumes prepared by macl_prepare_unlabeled for MACL "
                            f"pretraining. The labels are a {'body' if modality == 'CT' else 'foreground'} mask "
                            f"that satisfies nnU-Net (and gives CT normalisation its foreground), not a "
                            f"segmentation target."),
            "channel_names": {"0": modality},
            "labels": dict(LABELS[modality]),
            "numTraining": len(results),
            "file_ending": FILE_ENDING,
            "macl_unlabeled": {"modality": modality, "source_folder": input_folder,
                               "mask": (f"> {ct_threshold:g} HU, largest connected component, holes filled per slice"
                                        if modality == "CT" else "Otsu threshold, holes filled per slice")},
        }
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dataset_json, f, indent=2)
        with open(os.path.join(tmp, SOURCES_FILE), "w") as f:
            json.dump({"source_folder": input_folder, "cases": [asdict(r) for r in results],
                       "ignored_files": ignored}, f, indent=1)
        if os.path.exists(final):  # appeared meanwhile
            raise UnlabeledDataError(f"{final} appeared while converting; not overwriting it")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = PreparedDataset(final, dataset_name, modality, results, ignored, time.perf_counter() - t0)
    if log:
        for w in result.warnings:
            log(f"WARNING: {w}")
        fr = [c.mask_fraction for c in results]
        log(f"Wrote {len(results)} case(s) to {final} in {result.seconds:.1f} s; mask covers "
            f"{100 * min(fr):.1f}-{100 * max(fr):.1f} % of the voxels")
    return result

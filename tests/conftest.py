"""Shared pytest fixtures for nnunetv2_macl.

Fixtures (all session-scoped, built once per pytest run):

- ``nnunet_env``      -> dict of pathlib.Path: ``raw``, ``preprocessed``, ``results`` (also under the
                         env-var names ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``).
                         Fresh temp dirs exported as nnU-Net's environment variables for the session.
- ``tiny_dataset``    -> dict(id=990, name="Dataset990_MACLSynthetic", raw=<raw dataset folder>,
                         preprocessed=<preprocessed dataset folder>, plans="nnUNetPlans",
                         configuration="2d", plans_file=..., data_folder=<.../nnUNetPlans_2d>,
                         num_cases=8, shape=(16, 32, 32)): synthetic, planned and preprocessed for 2d.
- ``tiny_dataset_3d`` -> same keys for Dataset991_MACLSynthetic3D, preprocessed for 3d_fullres.
- ``hippocampus_raw`` -> Path of ../shared/data/Task04_Hippocampus (or $MACL_HIPPOCAMPUS_DIR);
                         skips when absent.
- ``hippocampus_dataset`` -> same keys as ``tiny_dataset`` for Dataset504_Hippocampus (all 200
                         cases, converted with nnU-Net's MSD converter), preprocessed for 2d.

Marker ``realdata`` (registered in pytest.ini): the slow tier on the real data. Tests that use
``hippocampus_raw``/``hippocampus_dataset`` get it automatically (see
``pytest_collection_modifyitems``), so ``-m "not realdata"`` always deselects them.

About nnU-Net's paths: in nnunetv2 2.8.1 ``nnunetv2.paths.nnUNet_raw`` & co. are ``_EnvPath``
objects that read ``os.environ`` lazily on every use (``os.fspath``/``str``/``join``), so setting
the environment variables in a fixture is enough even when nnunetv2 was imported earlier, and
worker processes (spawned) inherit them. Older nnU-Net versions bound plain strings at import
time (and every ``from nnunetv2.paths import nnUNet_raw`` copied them); for those
``_patch_eager_nnunet_paths`` rebinds the names in every loaded ``nnunetv2.*`` module.
``nnunetv2.configuration.default_num_processes`` *is* read at import time, so the process-count
variables are also set (setdefault, so a user's own values win) when this conftest is imported,
i.e. before any test module can import nnunetv2.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

# Before anything imports nnunetv2 (conftest is imported before test modules are collected).
os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "2")

_NUM_PROCESSES = int(os.environ["nnUNet_def_n_proc"])
_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_REALDATA_FIXTURES = {"hippocampus_raw", "hippocampus_dataset"}

HIPPOCAMPUS_DIR = Path(__file__).parents[1].parent / "shared/data/Task04_Hippocampus"


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs the real data as ``realdata``."""
    for item in items:
        if _REALDATA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)


def _patch_eager_nnunet_paths(mp: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    """For nnU-Net versions whose paths are plain strings bound at import time: rebind them.

    No-op for nnunetv2 >= the lazy ``_EnvPath`` implementation (2.8.1 here) and when nnunetv2 has
    not been imported yet (it will then read the environment on import).
    """
    paths_mod = sys.modules.get("nnunetv2.paths")
    if paths_mod is None:
        return
    for var, new in values.items():
        old = getattr(paths_mod, var, None)
        if old is not None and not isinstance(old, (str, type(None))):
            continue  # lazy object (e.g. _EnvPath): reads os.environ itself
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "nnunetv2" or mod_name.startswith("nnunetv2.")):
                continue
            if var in vars(mod) and vars(mod)[var] == old:
                mp.setattr(mod, var, new)


def _dataset_info(dataset_id: int, name: str, configuration: str, env: dict, **extra) -> dict:
    preprocessed = env["preprocessed"] / name
    plans = "nnUNetPlans"
    plans_file = preprocessed / f"{plans}.json"
    data_identifier = json.loads(plans_file.read_text())["configurations"][configuration]["data_identifier"]
    info = dict(id=dataset_id, name=name, raw=env["raw"] / name, preprocessed=preprocessed, plans=plans,
                configuration=configuration, plans_file=plans_file, data_folder=preprocessed / data_identifier,
                results=env["results"])
    info.update(extra)
    return info


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory):
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results for this session (restored after)."""
    base = tmp_path_factory.mktemp("nnunet")
    env = {"raw": base / "raw", "preprocessed": base / "preprocessed", "results": base / "results"}
    for p in env.values():
        p.mkdir(parents=True, exist_ok=True)
    values = {"nnUNet_raw": str(env["raw"]), "nnUNet_preprocessed": str(env["preprocessed"]),
              "nnUNet_results": str(env["results"])}
    mp = pytest.MonkeyPatch()
    for var, value in values.items():
        mp.setenv(var, value)
    mp.setenv("nnUNet_def_n_proc", os.environ.get("nnUNet_def_n_proc", "2"))
    mp.setenv("nnUNet_n_proc_DA", os.environ.get("nnUNet_n_proc_DA", "2"))
    _patch_eager_nnunet_paths(mp, values)
    env.update({var: Path(v) for var, v in values.items()})
    try:
        yield env
    finally:
        mp.undo()


@pytest.fixture()
def trainer_env(monkeypatch, tmp_path):
    """Our trainers found through nnUNet_extTrainer, writing into a private nnUNet_results, no MACL_PRETRAINED."""
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(os.environ.get("nnUNet_extTrainer")))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv("MACL_PRETRAINED", raising=False)
    return tmp_path


def _make_tiny(env: dict, dataset_id: int, name: str, configuration: str, shape, num_cases: int) -> dict:
    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset, plan_and_preprocess

    t0 = time.perf_counter()
    make_synthetic_dataset(str(env["raw"]), dataset_id=dataset_id, name=name, num_cases=num_cases,
                           shape=shape, seed=0)
    plan_and_preprocess(dataset_id, configurations=(configuration,), num_processes=_NUM_PROCESSES)
    info = _dataset_info(dataset_id, f"Dataset{dataset_id:03d}_{name}", configuration, env,
                         num_cases=num_cases, shape=tuple(shape))
    info["setup_seconds"] = time.perf_counter() - t0
    return info


@pytest.fixture(scope="session")
def tiny_dataset(nnunet_env):
    """8 synthetic cases of 16x32x32, planned (nnUNetPlans) and preprocessed for 2d (~10 s)."""
    return _make_tiny(nnunet_env, 990, "MACLSynthetic", "2d", (16, 32, 32), 8)


@pytest.fixture(scope="session")
def tiny_dataset_3d(nnunet_env):
    """8 synthetic cases of 16x32x32, planned (nnUNetPlans) and preprocessed for 3d_fullres."""
    info = _make_tiny(nnunet_env, 991, "MACLSynthetic3D", "3d_fullres", (16, 32, 32), 8)
    assert info["data_folder"].is_dir(), "3d_fullres was not preprocessed for the tiny 3D dataset"
    return info


@pytest.fixture(scope="session")
def hippocampus_raw():
    """The real MSD Task04_Hippocampus folder (read-only, never copied into the repo)."""
    path = Path(os.environ.get("MACL_HIPPOCAMPUS_DIR", HIPPOCAMPUS_DIR))
    if not (path / "dataset.json").is_file() or not (path / "imagesTr").is_dir():
        pytest.skip(f"real Hippocampus data not found at {path}; the realdata tier needs ../shared")
    return path


@pytest.fixture(scope="session")
def hippocampus_dataset(nnunet_env, hippocampus_raw, tmp_path_factory):
    """All 200 Hippocampus cases as Dataset504_Hippocampus, planned and preprocessed for 2d.

    Converted in place with :func:`nnunetv2_macl.fewlabel.msd.convert_msd` (nnU-Net's MSD converter
    through a folder of links; the shared copy has no ``imagesTs``). Measured on 2 cores: ~1 s
    conversion + ~20 s fingerprint/plan/preprocess, so no subset is needed.
    """
    from nnunetv2_macl.demo.synthetic import plan_and_preprocess
    from nnunetv2_macl.fewlabel.msd import convert_msd

    t0 = time.perf_counter()
    dataset_id = 504
    name = convert_msd(hippocampus_raw, dataset_id, tmp_path_factory.mktemp("msd"), num_processes=_NUM_PROCESSES)
    plan_and_preprocess(dataset_id, configurations=("2d",), num_processes=_NUM_PROCESSES)
    num_cases = len(list((nnunet_env["raw"] / name / "labelsTr").glob("*.nii.gz")))
    info = _dataset_info(dataset_id, name, "2d", nnunet_env, num_cases=num_cases)
    info["setup_seconds"] = time.perf_counter() - t0
    return info

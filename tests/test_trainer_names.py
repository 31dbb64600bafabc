"""Every public trainer name, as stock ``nnUNetv2_train -tr NAME`` finds it: the start it promises (which parts of a
MACL pretraining are handed over) and the fine-tuning recipe it runs. One table, so that moving a default (issue 29
step 4) shows here as the rows it changes, and a name that promises "stock" or "encoder" keeps meaning it."""
from __future__ import annotations

import pytest

# name -> (finetune_recipe, macl_transfer_scope); scope None: a random start (no MACL weights are loaded)
TRAINERS = {
    # what users run: the rescale recipe by measurement (issue 29 step 4)
    "nnUNetTrainerMACL": ("rescale", "encoder"),
    "nnUNetTrainerMACL_1epoch": ("rescale", "encoder"),
    "nnUNetTrainerMACL_5epochs": ("rescale", "encoder"),
    "nnUNetTrainerMACL_10epochs": ("rescale", "encoder"),
    "nnUNetTrainerMACL_50epochs": ("rescale", "encoder"),
    "nnUNetTrainerMACL_100epochs": ("rescale", "encoder"),
    "nnUNetTrainerMACL_paperSchedule": ("stock", "encoder"),
    # named recipes and hand-overs (recipe_trainers.py)
    "nnUNetTrainerMACL_stock": ("stock", "encoder"),
    "nnUNetTrainerMACL_warmup": ("warmup", "encoder"),
    "nnUNetTrainerMACL_encoder": ("stock", "encoder"),
    "nnUNetTrainerMACL_paperTransfer": ("stock", "pretrained"),
    "nnUNetTrainerMACL_protect": ("protect", "encoder"),
    "nnUNetTrainerMACL_paperTransfer_protect": ("protect", "pretrained"),
    "nnUNetTrainerMACL_rescale": ("rescale", "encoder"),
    "nnUNetTrainerMACL_paperTransfer_rescale": ("rescale", "pretrained"),
    "nnUNetTrainerScratch_warmup": ("warmup", None),
    # the few-label benchmark's arms (benchmark_trainers.py): fixed, whatever the user-facing default
    "nnUNetTrainerMACL_bench": ("stock", "pretrained"),
    "nnUNetTrainerMACL_encoder_bench": ("stock", "encoder"),
    "nnUNetTrainerMACL_warmup_bench": ("warmup", "pretrained"),
    "nnUNetTrainerMACL_warmup_encoder_bench": ("warmup", "encoder"),
    "nnUNetTrainerMACL_protect_bench": ("protect", "pretrained"),
    "nnUNetTrainerMACL_protect_encoder_bench": ("protect", "encoder"),
    "nnUNetTrainerMACL_rescale_bench": ("rescale", "pretrained"),
    "nnUNetTrainerMACL_rescale_encoder_bench": ("rescale", "encoder"),
    "nnUNetTrainerScratch_bench": ("stock", None),
    "nnUNetTrainerScratch_warmup_bench": ("warmup", None),
    # the demo's short schedules (demo_trainers.py)
    "nnUNetTrainerMACL_demo": ("rescale", "encoder"),
    "nnUNetTrainerScratch_demo": (None, None),
    # random starts on schedules nnU-Net does not ship
    "nnUNetTrainerScratch_1epoch": (None, None),
    "nnUNetTrainerScratch_paperSchedule": (None, None),
}


@pytest.fixture
def find_trainer(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(None))
    return recursive_find_trainer_class_by_name


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_is_found_by_nnunet_with_the_start_and_recipe_its_name_promises(find_trainer, name):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    recipe, scope = TRAINERS[name]
    cls = find_trainer(name)
    assert cls.__name__ == name and issubclass(cls, nnUNetTrainer)
    loads_macl = any(b.__name__ == "nnUNetTrainerMACL" for b in cls.__mro__)
    assert loads_macl == (scope is not None)
    assert getattr(cls, "finetune_recipe", None) == recipe
    if loads_macl:
        assert cls.macl_transfer_scope == scope


def test_the_table_lists_every_public_trainer(find_trainer):
    """A trainer added without a row here fails: its promise would otherwise go unchecked."""
    import importlib.util
    import inspect
    from pathlib import Path

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_macl.run.trainer_path import trainers_dir

    public = set()
    for path in Path(trainers_dir()).glob("*.py"):  # as nnU-Net reads the folder: each file by its path
        spec = importlib.util.spec_from_file_location(f"_trainer_names_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        public |= {n for n, obj in vars(module).items()
                   if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and n.startswith("nnUNetTrainer")
                   and obj.__module__ == module.__name__}
    assert public == set(TRAINERS)
    # nnU-Net's own scratch counterparts of the length variants exist under these names
    for name in ("nnUNetTrainer_1epoch", "nnUNetTrainer_5epochs", "nnUNetTrainer_50epochs", "nnUNetTrainer_100epochs"):
        assert find_trainer(name).__module__.startswith("nnunetv2.")

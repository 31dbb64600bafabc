"""The test session shares one nnU-Net folder tree (``nnunet_env``), so two test files that create the same
dataset id under different names make nnU-Net refuse the id ("More than one dataset name found") in whichever
runs second. This happened twice; this check reads the test files and names the collision before a 14-minute
suite does."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent
# lines that create or name a dataset by id
CREATES = re.compile(r"make_small_dataset|make_dataset|make_unlabeled_copy|make_synthetic_dataset|"
                     r"prepare_unlabeled_dataset|dataset_id\s*=|\b[A-Z0-9_]*ID[A-Z0-9_]*\s*(,\s*[A-Z0-9_]+)?\s*=|"
                     r"DATASET_[A-Z]+\s*=|\"-d\",")
DATASET_ID = re.compile(r"(?<![\d.])([5-9]\d\d)(?![\d.])")
SHARED = {990, 991}  # conftest's session fixtures, meant to be shared


def dataset_ids_by_file() -> dict[int, set[str]]:
    owners: dict[int, set[str]] = defaultdict(set)
    for path in sorted(TESTS.glob("test_*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            code = line.split("#", 1)[0]
            if CREATES.search(code) and "timeout" not in code:
                for match in DATASET_ID.finditer(code):
                    owners[int(match.group(1))].add(path.name)
    return owners


def test_the_scan_finds_the_ids_it_should():
    owners = dataset_ids_by_file()
    # one id of each way of writing it, so that a regex that stops matching fails here, not silently
    assert "test_transfer.py" in owners[961] and "test_cross_plan.py" in owners[941]
    assert "test_masked_reconstruction.py" in owners[921] and "test_fewlabel.py" in owners[981]
    assert "test_unlabeled.py" in owners[973] and "test_pretrain.py" in owners[995]
    assert "test_3d_resenc.py" in owners[971] and "test_multi_dataset.py" in owners[944]


def test_no_two_test_files_create_the_same_dataset_id():
    shared = {i: sorted(files) for i, files in dataset_ids_by_file().items() if len(files) > 1 and i not in SHARED}
    assert not shared, f"dataset ids used by more than one test file (pick a free id): {shared}"

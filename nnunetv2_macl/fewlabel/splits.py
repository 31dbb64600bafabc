"""Few-label splits: validation cases that no training set contains, nested training budgets.

Two schemes, both written as nnU-Net's ``splits_final.json`` (entry ``m_index * n_folds + fold`` is
budget ``budgets[m_index]`` on fold ``fold``; ``splits_index.json`` maps the entries back):

- ``heldout`` (the protocol): ``n_val`` cases (first of a seeded order of the sorted identifiers) are
  the validation set of every fold and budget; fold f draws its training sets from the other cases in
  the order ``default_rng([seed, f])``: budget M takes the first M, so the sets are nested. Folds are
  different draws over the same validation set.
- ``kfold`` (the earlier benchmark, for rerunning old rows): fold f validates on the held-out part f of
  nnU-Net's ``generate_crossval_split`` (capped to ``n_val`` cases of a seeded order if given) and draws
  its nested training sets from its training part.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_macl.errors import FewLabelError

SCHEMES = ("heldout", "kfold")


def split_index(budget_index: int, fold: int, n_folds: int) -> int:
    return int(budget_index) * int(n_folds) + int(fold)


def _check_budgets(budgets: Sequence[int]) -> list[int]:
    budgets = [int(m) for m in budgets]
    if not budgets or budgets != sorted(set(budgets)) or budgets[0] < 1:
        raise FewLabelError(f"budgets must be distinct positive numbers in increasing order, got {budgets}")
    return budgets


def make_splits(case_ids: Sequence[str], budgets: Sequence[int], n_folds: int, scheme: str = "heldout",
                n_val: int | None = 40, seed: int = 12345, n_splits: int = 5) -> dict:
    """``{"splits": [...], "index": [{index, budget, fold, train, val}], "meta": {...}}`` (module doc).

    Deterministic in (case set, budgets, n_folds, scheme, n_val, seed); the input order does not matter.
    """
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise FewLabelError("case identifiers are not unique")
    budgets = _check_budgets(budgets)
    if scheme not in SCHEMES:
        raise FewLabelError(f"split scheme must be one of {SCHEMES}, got {scheme!r}")
    if n_folds < 1:
        raise FewLabelError(f"n_folds must be >= 1, got {n_folds}")
    if n_val is not None and n_val < 1:
        raise FewLabelError(f"the number of validation cases must be >= 1, got {n_val}")
    per_fold: list[tuple[list[str], list[str]]] = []  # (validation, training pool in draw order)
    if scheme == "heldout":
        if n_val is None or n_val >= len(ids):
            hint = max(1, len(ids) * 2 // 5)  # a suggestion only: 2/5 held out leaves most cases to draw from
            raise FewLabelError(f"--val-cases must be below the {len(ids)} cases, got {n_val} (e.g. --val-cases {hint} "
                                f"leaves {len(ids) - hint} cases to draw the training sets from)")
        order = np.random.default_rng([seed, 1000]).permutation(len(ids))
        val = sorted(ids[i] for i in order[:n_val])
        rest = sorted(ids[i] for i in order[n_val:])
        for f in range(n_folds):
            per_fold.append((val, [rest[i] for i in np.random.default_rng([seed, f]).permutation(len(rest))]))
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        if not 2 <= n_splits <= len(ids):
            raise FewLabelError(f"n_splits must be in 2..{len(ids)} (the number of cases), got {n_splits}")
        if n_folds > n_splits:
            raise FewLabelError(f"n_folds must be in 1..{n_splits}, got {n_folds}")
        partition = generate_crossval_split(ids, seed=seed, n_splits=n_splits)
        for f in range(n_folds):
            val = sorted(str(c) for c in partition[f]["val"])
            if n_val is not None and len(val) > n_val:
                order = np.random.default_rng([seed, f, 1]).permutation(len(val))
                val = sorted(val[i] for i in order[:n_val])
            pool = sorted(str(c) for c in partition[f]["train"])
            per_fold.append((val, [pool[i] for i in np.random.default_rng([seed, f]).permutation(len(pool))]))
    splits: list[dict] = [{}] * (len(budgets) * n_folds)
    index: list[dict] = []
    for f, (val, pool) in enumerate(per_fold):
        if budgets[-1] > len(pool):
            raise FewLabelError(f"budget M={budgets[-1]} exceeds the {len(pool)} cases fold {f} can train on "
                                f"({len(ids)} cases, {len(val)} for validation): lower --budgets or --val-cases")
        for mi, m in enumerate(budgets):
            i = split_index(mi, f, n_folds)
            splits[i] = {"train": list(pool[:m]), "val": list(val)}
            index.append({"index": i, "budget": m, "fold": f, "train": list(pool[:m]), "val": list(val)})
    index.sort(key=lambda r: r["index"])
    meta = {"num_cases": len(ids), "budgets": budgets, "n_folds": int(n_folds), "scheme": scheme,
            "n_val": n_val, "n_splits": int(n_splits) if scheme == "kfold" else None, "seed": int(seed),
            "rule": ("index = m_index * n_folds + fold; "
                     + ("val = the same n_val held-out cases for every fold" if scheme == "heldout" else
                        "val = held-out part of nnU-Net's K-fold partition")
                     + "; train = first M of the fold's seeded order of the other cases (nested over M)")}
    return {"splits": splits, "index": index, "meta": meta}


def validation_union(plan: dict) -> list[str]:
    """Every case that some fold validates on (the cases a pretraining excludes by default)."""
    return sorted({c for r in plan["index"] for c in r["val"]})


def write_json(path: Path, data) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_splits(folder: str | os.PathLike, plan: dict) -> tuple[Path, Path]:
    """``splits_final.json`` (read by nnU-Net) and ``splits_index.json`` (the mapping) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits_file, index_file = folder / "splits_final.json", folder / "splits_index.json"
    write_json(splits_file, plan["splits"])
    write_json(index_file, {"meta": plan["meta"], "index": plan["index"]})
    return splits_file, index_file


def read_splits(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    idx = json.loads((folder / "splits_index.json").read_text())
    return {"splits": json.loads((folder / "splits_final.json").read_text()), **idx}

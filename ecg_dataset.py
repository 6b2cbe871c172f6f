"""The experiment's data: the converted HDF5 of a dataset, its seeded split, and a lazy Dataset.

    data = load_experiment_datasets(find_dataset_h5("Preprocessed_dataset", "WFDB_PTBXL"), 0.1, seed=18)

The split is multi-label iterative stratification: a labelled pool of `finetune_label_ratio` of
the records against the test set, then the pool 80% training, 20% validation.
"""
import json
import os
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

from helper_code import LEADS, NUM_LEADS, dataset_classes, h5_name


def find_dataset_h5(preprocessed_dir, dataset):
    """The converted HDF5 of `dataset` in `preprocessed_dir`, whatever its class count."""
    preprocessed_dir = Path(preprocessed_dir)
    found = sorted(preprocessed_dir.glob(h5_name(dataset, "*")))
    if len(found) > 1:
        raise FileNotFoundError(f"several converted files for {dataset} in {preprocessed_dir}: "
                                f"{', '.join(p.name for p in found)}; keep one")
    if not found:
        try:
            expected = preprocessed_dir / h5_name(dataset, len(dataset_classes(dataset)))
        except KeyError:
            expected = preprocessed_dir / h5_name(dataset, "{C}")
        raise FileNotFoundError(
            f"no converted dataset at {expected}. Convert the PhysioNet/CinC Challenge 2021 training data "
            f"with `python datacollection.py --data_root OriginalData --preprocessed_dir {preprocessed_dir}`, "
            f"or make synthetic data with `python datacollection.py --demo`")
    return found[0]


def iterative_stratification(labels, proportions, rng):
    """Subset index per row, multi-label stratified (Sechidis, Tsoumakas & Vlahavas, 2011).

    Repeatedly take the label with the fewest unassigned examples and give each of its examples
    to the subset that still wants most of that label (ties: the subset wanting most examples
    overall, then random). Rows without labels fill the subsets wanting most examples.
    """
    labels = np.asarray(labels) > 0
    n_rows = len(labels)
    proportions = np.asarray(proportions, dtype=np.float64) / np.sum(proportions)
    wanted = proportions * n_rows
    wanted_label = proportions[:, None] * labels.sum(axis=0)[None, :]
    subset = np.full(n_rows, -1)
    visit = rng.permutation(n_rows)

    def pick(scores, tie_break):
        best = np.flatnonzero(scores == scores.max())
        if len(best) > 1:
            best = best[tie_break[best] == tie_break[best].max()]
        return best[0] if len(best) == 1 else rng.choice(best)

    while True:
        open_rows = visit[subset[visit] < 0]
        remaining = labels[open_rows].sum(axis=0)
        if not remaining.any():
            break
        label = np.flatnonzero(remaining == remaining[remaining > 0].min())[0]
        for row in open_rows[labels[open_rows, label]]:
            chosen = pick(wanted_label[:, label], wanted)
            subset[row] = chosen
            wanted_label[chosen] -= labels[row]
            wanted[chosen] -= 1
    for row in visit[subset[visit] < 0]:
        chosen = pick(wanted, wanted)
        subset[row] = chosen
        wanted[chosen] -= 1
    return subset


class ECGH5Dataset(torch.utils.data.Dataset):
    """Records of an HDF5 file read lazily by index; one file handle per process, opened on first use.

    `leads`: indices (or names) of leads to keep; the others are zeroed (reduced-lead students).
    """

    def __init__(self, h5_path, indices=None, leads=None):
        self.h5_path = Path(h5_path)
        with h5py.File(self.h5_path, "r") as f:
            all_labels = f["label_set"][:]
        self.indices = np.arange(len(all_labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = all_labels[self.indices].astype(np.float32)
        self.num_classes = self.labels.shape[1]
        self.lead_mask = None
        if leads is not None:
            keep = [LEADS.index(lead) if isinstance(lead, str) else int(lead) for lead in leads]
            self.lead_mask = torch.zeros(NUM_LEADS, 1, 1)
            self.lead_mask[keep] = 1.0
        self._records = None
        self._pid = None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if self._records is None or self._pid != os.getpid():
            self._records = h5py.File(self.h5_path, "r")["record_set"]
            self._pid = os.getpid()
        x = torch.from_numpy(self._records[self.indices[i]])
        if self.lead_mask is not None:
            x = x * self.lead_mask
        return x, torch.from_numpy(self.labels[i])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_records"] = None
        return state


def record_names(h5_path, indices=None):
    """The `record_names` of an HDF5's rows (all, or those at `indices`) as str; None where the file
    has none (converted elsewhere)."""
    with h5py.File(h5_path, "r") as f:
        if "record_names" not in f:
            return None
        names = f["record_names"][:]
    chosen = names if indices is None else names[np.asarray(indices, dtype=np.int64)]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in chosen]


class ExperimentData(NamedTuple):
    train: ECGH5Dataset
    valid: ECGH5Dataset
    test: ECGH5Dataset
    positive_rates: np.ndarray
    positive_probably: float
    class_codes: list
    class_names: list
    preprocessing: dict | None        # what the converter did to every record (None: not recorded)


def load_experiment_datasets(h5_path, finetune_label_ratio, seed):
    """The experiment split: stratified labelled pool (ratio) vs test, then pool 80% train / 20% valid."""
    with h5py.File(h5_path, "r") as f:
        labels = f["label_set"][:]
        class_codes = [str(c) for c in f.attrs.get("class_codes", [])]
        class_names = [str(c) for c in f.attrs.get("class_names", [])]
        preprocessing = json.loads(f.attrs["preprocessing"]) if "preprocessing" in f.attrs else None
    if not class_codes:  # a file converted elsewhere: only record_set and label_set
        class_codes = [str(i) for i in range(labels.shape[1])]
        class_names = list(class_codes)
    rng = np.random.default_rng(seed)
    first = iterative_stratification(labels, [finetune_label_ratio, 1 - finetune_label_ratio], rng)
    pool, test = np.flatnonzero(first == 0), np.flatnonzero(first == 1)
    second = iterative_stratification(labels[pool], [0.8, 0.2], rng)
    train, valid = pool[second == 0], pool[second == 1]
    positive_rates = labels[pool].mean(axis=0)
    return ExperimentData(ECGH5Dataset(h5_path, train), ECGH5Dataset(h5_path, valid), ECGH5Dataset(h5_path, test),
                          positive_rates, float(positive_rates.mean()), class_codes, class_names, preprocessing)

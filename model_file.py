"""The merged model file: what a finished stage writes, what --teacher distils from and predict.py applies.

A finished stage writes `merged_*.pt` (runs.Stage.save_merged) holding
- `settings` and `writer`: the stage's, as in every checkpoint (runs.py);
- `result`: the stage's test result, its arrays as tensors;
- `model`: what applying the model needs (model_description): config, num_class, positive_probably,
  class_codes, class_names, thresholds, leads, preprocessing, split, and state_dict, the merged
  weights of an r=0 model.

The file describes itself, so applying it needs nothing of the run that wrote it; a file written
before files described themselves is completed with what was assumed (completed_description).
This module imports nothing of training: predict.py reads a model without loading the training loop.
"""
import logging
from pathlib import Path

import h5py
import numpy as np
import torch

import evaluation
from ecg_dataset import record_names
from helper_code import LABEL_ABBREVIATION, NUM_LEADS
from model_src_ecg import KEPT_LEADS, build_model
from runs import check_writer

log = logging.getLogger("adagrad_fusion.model_file")


# ---------------------------------------------------------------------------------------------
# Writing: what a finished stage saves
# ---------------------------------------------------------------------------------------------
def merged_state(net):
    """A merged net's weights without its adapters (folded in, B zeroed): an r=0 model's state dict."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items() if "lora_" not in k}


def model_description(net, cfg, data, thresholds):
    """Everything needed to apply the merged model to new records, beside its weights."""
    return {"config": cfg.config, "num_class": int(net.classifier[1].out_features),
            "positive_probably": float(net.positive_probably), "class_codes": list(data.class_codes),
            "class_names": list(data.class_names), "thresholds": torch.from_numpy(np.asarray(thresholds, np.float64)),
            "leads": list(KEPT_LEADS[cfg.leads]), "preprocessing": data.preprocessing,
            "split": split_description(data, cfg.seed), "state_dict": merged_state(net)}


def split_description(data, seed):
    """Which records the model was validated and tested on: the HDF5 (as the run named it), its row
    count, the seed, and the rows of each split; the validation records also by name, so that
    calibration (predict.py --int8) can find them in a folder of records and never takes a test one."""
    h5_path = data.valid.h5_path
    with h5py.File(h5_path, "r") as f:
        rows = len(f["label_set"])
    return {"h5": str(h5_path), "rows": rows, "seed": int(seed),
            "validation": torch.from_numpy(np.asarray(data.valid.indices, np.int64)),
            "validation_names": record_names(h5_path, data.valid.indices),
            "test": torch.from_numpy(np.asarray(data.test.indices, np.int64))}


def result_to_tensors(result):
    return {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in result.items()}


def result_from_tensors(result):
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


# ---------------------------------------------------------------------------------------------
# Reading: the result, the merged net and its description
# ---------------------------------------------------------------------------------------------
def is_merged(saved):
    """Whether `saved` (what torch.load gave) is the dict of a merged file."""
    return isinstance(saved, dict) and "model" in saved and "result" in saved


def load_merged(path, device):
    """(result, merged net in eval mode, model description) from a `merged_*.pt` file; one another run
    overwrote (its recorded writer is not the stage its name says) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merged model not found: {path} (a finished run writes merged_*.pt into its "
                                f"checkpoint_dir)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    check_writer(path, saved)
    return model_from_file(saved, device, path)


def model_from_file(saved, device, path="a merged model file"):
    """(result, merged net in eval mode, model description) from the dict a finished stage wrote."""
    result = result_from_tensors(saved["result"])
    model = completed_description(saved["model"], result, path)
    net = build_model(model["config"], model["num_class"], r=0, positive_probably=model["positive_probably"])
    net.load_state_dict(model["state_dict"])
    net.requires_grad_(False)
    return result, net.to(device).eval(), model


def completed_description(model, result, path):
    """The model description of a merged file; one written before the files described themselves
    lacks class names, thresholds, leads and preprocessing: they are filled in, from its result
    where it recorded them, and a warning says what was assumed."""
    model, assumed = dict(model), []
    if "class_names" not in model:
        model["class_names"] = [LABEL_ABBREVIATION.get(str(code), str(code)) for code in model["class_codes"]]
        assumed.append("class_names (the codes' abbreviations)")
    if "thresholds" not in model:
        recorded = "thresholds" in result
        thresholds = result["thresholds"] if recorded else np.full(model["num_class"], evaluation.DEFAULT_THRESHOLD)
        model["thresholds"] = torch.from_numpy(np.asarray(thresholds, np.float64))
        assumed.append("thresholds (its test result's, chosen on validation)" if recorded
                       else f"thresholds ({evaluation.DEFAULT_THRESHOLD} for every class)")
    if "leads" not in model:
        model["leads"] = list(KEPT_LEADS[int(result.get("leads", NUM_LEADS))])
        source = "the lead count in its result" if "leads" in result else "all 12"
        assumed.append(f"leads ({', '.join(model['leads'])}: {source})")
    if "preprocessing" not in model:
        from datacollection import PREPROCESSING  # the converter's, only for a file that does not say
        model["preprocessing"] = dict(PREPROCESSING)
        assumed.append("preprocessing (the converter's: datacollection.PREPROCESSING)")
    if assumed:
        log.warning("%s was written before merged files described themselves; assumed: %s", path, "; ".join(assumed))
    return model

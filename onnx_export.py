"""ONNX export of a model predict.py loaded, and its int8 quantization by ONNX Runtime.

    python predict.py --model MODEL --export model.onnx [--int8 [--calibrate RECORDS]]

export_onnx writes what applying the model computes (lead masking, the network, the main head's
probabilities, the labels at its thresholds) as one graph with a dynamic batch size, and in the
file's metadata what applying it needs (ONNX_METADATA), which predict.py reads back. With
calibration records (predict.calibration_source: the model's validation records, never a test
record) it also writes the model statically quantized to int8, beside it. docs/predict.md
describes both files and what stays float32.
"""
import ast
import collections
import contextlib
import copy
import json
import logging
import tempfile
from pathlib import Path

import torch

from datacollection import SAMPLES
from helper_code import LEADS, NUM_LEADS, atomic_path
from model_src_ecg import NN_default, mask_leads

log = logging.getLogger("adagrad_fusion.onnx_export")

ONNX_INPUT = "ecg"
ONNX_OUTPUTS = ("probabilities", "labels")
ONNX_PACKAGES = ("onnx", "onnxscript")   # torch.onnx.export needs both; onnxruntime runs the file
ONNX_RUNTIME = "onnxruntime"
INT8_SUFFIX = ".int8.onnx"               # the int8 model is written beside the float32 one
ONNX_METADATA = ("config", "class_codes", "class_names", "thresholds", "leads", "preprocessing")
CALIBRATION_BATCH = 32                   # calibration records read and run together


# ---------------------------------------------------------------------------------------------
# Export: the model, its lead masking and thresholds, as one ONNX graph
# ---------------------------------------------------------------------------------------------
class ExportedModel(torch.nn.Module):
    """What the ONNX file computes from a (batch, 12, 1, SAMPLES) input: the model's lead masking,
    its network, the main head's probabilities, and the labels at the stored thresholds (compared
    in float64, as the CSV's)."""

    def __init__(self, net, leads, thresholds):
        super().__init__()
        self.net, self.n_leads = net, len(leads)
        self.register_buffer("thresholds", torch.as_tensor(thresholds, dtype=torch.float64))

    def forward(self, ecg):
        if self.n_leads != NUM_LEADS:
            ecg = mask_leads(ecg, self.n_leads)
        probs = torch.sigmoid(self.net(ecg)[1])
        return probs, probs.double() >= self.thresholds


def onnx_metadata(model):
    """The ONNX file's metadata_props: what applying it needs, as JSON text."""
    return {"config": model.config, "class_codes": json.dumps(model.class_codes),
            "class_names": json.dumps(model.class_names), "thresholds": json.dumps(model.thresholds.tolist()),
            "leads": json.dumps(list(model.leads)), "preprocessing": json.dumps(model.preprocessing),
            "input": f"{ONNX_INPUT}: (batch, {NUM_LEADS}, 1, {SAMPLES}) float32, preprocessed records, leads in "
                     f"{', '.join(LEADS)} order (leads the model does not read are zeroed inside)",
            "outputs": f"{ONNX_OUTPUTS[0]}: (batch, classes) float32, the main head's sigmoid; {ONNX_OUTPUTS[1]}: "
                       f"(batch, classes) bool, probability >= threshold"}


def onnx_proto(model):
    """`model` as an ONNX ModelProto at a fixed 12 x SAMPLES input and a dynamic batch size, its
    metadata set."""
    import onnx

    for name in ("onnxscript", "onnx_ir"):     # their INFO lines narrate every graph rewrite
        logging.getLogger(name).setLevel(logging.WARNING)
    net = copy.deepcopy(model.net).cpu().eval()
    if isinstance(net, NN_default):
        net.lean_forward = False   # the streamed no-grad forward splits the batch by its size; same values
    exported = ExportedModel(net, model.leads, model.thresholds).eval()
    example = torch.zeros(2, NUM_LEADS, 1, SAMPLES)
    with torch.no_grad():
        program = torch.onnx.export(exported, (example,), dynamo=True, input_names=[ONNX_INPUT],
                                    output_names=list(ONNX_OUTPUTS),
                                    dynamic_shapes={ONNX_INPUT: {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    onnx.helper.set_model_props(proto, onnx_metadata(model))
    return proto


def int8_path(path):
    """Where --int8 writes the quantized model: FILE.int8.onnx beside FILE.onnx."""
    return Path(path).with_suffix(INT8_SUFFIX)


def export_onnx(model, path, calibration=None):
    """Write `model` as ONNX at `path`; with `calibration` (a RecordSource), also its int8 model at
    int8_path(path). Both files appear together, whole, or neither does."""
    import onnx

    proto = onnx_proto(model)
    kept = float_nodes(proto) if calibration is not None else {}
    for node in proto.graph.node:     # the exporter's debugging aids: module scopes, stack traces with this
        del node.metadata_props[:]    # machine's paths; a tenth of a small model's file
    with contextlib.ExitStack() as stack:
        float_tmp = stack.enter_context(atomic_path(path))
        onnx.save(proto, str(float_tmp))
        if calibration is not None:
            quantize_int8(float_tmp, stack.enter_context(atomic_path(int8_path(path))), calibration, kept)
    log.info("wrote %s: input %s (batch, %d, 1, %d); outputs %s", path, ONNX_INPUT, NUM_LEADS, SAMPLES,
             ", ".join(ONNX_OUTPUTS))
    if calibration is not None:
        log.info("wrote %s: the same, int8 (%.0f%% of the float32 file's size)", int8_path(path),
                 100 * int8_path(path).stat().st_size / Path(path).stat().st_size)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# int8: static quantization by ONNX Runtime, calibrated on the model's validation records
# ---------------------------------------------------------------------------------------------
class CalibrationBatches:
    """ONNX Runtime's CalibrationDataReader over a RecordSource: {input name: batch} until the records
    run out (`records` counts them); a record that cannot be read is logged, as predict.py's scoring does."""

    def __init__(self, source, batch_size=CALIBRATION_BATCH):
        self.batches = source.batches(batch_size)
        self.records = 0

    def get_next(self):
        for batch in self.batches:
            for name, reason, detail in batch.skipped:
                log.warning("calibration: skipped %s: %s%s", name, reason, f" ({detail})" if detail else "")
            if batch.names:
                self.records += len(batch.names)
                return {ONNX_INPUT: batch.inputs}
        return None


def float_nodes(proto):
    """{node name: why it stays float32} for the nodes of an exported model that static int8 would
    harm (measured on the demo's tinylight student: docs/predict.md):
    - attention's score path (q.k^T, the scale, the causal mask, softmax, p.v): the mask is -3.4e38
      where a token may not look, so one int8 scale for the masked scores flattens every real score
      to the same step, and attention becomes a plain average;
    - layer normalisation: ONNX Runtime's CPU provider has no int8 kernel for it, so quantizing it
      only adds rounding around the float kernel;
    - each head's last layer and all that follows (gating, sigmoid, thresholds): the probabilities
      keep float resolution instead of 256 steps, and the labels their float thresholds."""
    kept, after_heads = {}, set()
    for node in proto.graph.node:         # in topological order, as ONNX requires
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), [])
        if "scaled_dot_product_attention" in scopes or node.op_type == "Softmax":
            kept[node.name] = "attention scores"
        elif node.op_type == "LayerNormalization":
            kept[node.name] = "layer normalisation"
        elif set(scopes) & {"net.classifier.1", "net.auxiliary_classifier.2"} or after_heads & set(node.input):
            kept[node.name] = "head outputs"
            after_heads.update(node.output)
    return kept


def quantize_int8(float_path, out_path, calibration, kept):
    """The float32 ONNX file at `float_path` statically quantized by ONNX Runtime's tools to
    `out_path`: its pre-processing (shape inference, constant folding), then QDQ with int8 weights
    per output channel and uint8 activations per tensor, ranges the min/max over the calibration
    records; the nodes of `kept` ({name: reason}, float_nodes) stay float32. The file carries the
    float file's metadata and a `quantization` entry saying how it was made."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    proto = onnx.load(str(float_path))
    reader = CalibrationBatches(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized_path = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # the symbolic pass cannot follow the exporter's shape arithmetic; ONNX's own inference can
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=sorted(kept), calibrate_method=CalibrationMethod.MinMax)
        quantized = onnx.load(str(quantized_path))
    how = {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8, per tensor",
           "calibration": f"min/max over {reader.records} records of {calibration.path}",
           "float32": sorted(collections.Counter(kept.values()))}
    metadata = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(quantized, {**metadata, "quantization": json.dumps(how)})
    onnx.save(quantized, str(out_path))
    log.info("int8: calibrated on %d records; kept in float32: %s", reader.records,
             ", ".join(f"{what} ({count} nodes)" for what, count in sorted(collections.Counter(kept.values()).items()))
             or "nothing")


def missing_onnx_packages(packages=ONNX_PACKAGES):
    import importlib.util

    return [name for name in packages if importlib.util.find_spec(name) is None]

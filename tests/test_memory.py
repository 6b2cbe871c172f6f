"""The simulated allocator (LiveStorageCounter) and the `memory` benchmark section built on it."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import benchmark
from helper_code import ALLOCATOR_BLOCK_BYTES, LiveStorageCounter

SAMPLES = 1024   # 16 tokens: every code path of the backbone, at a fraction of the cost
NUM_CLASS = 5
BATCH, BP_BATCH = 6, 2
pytestmark = pytest.mark.usefixtures("one_thread")

MEMORY_METHODS = [*benchmark.MEMORY_STEP_METHODS,
                  *(f"infer_{role}_{size}" for role in ("teacher", "student") for size in ("b1", "bB"))]


@pytest.mark.parametrize("fake", [False, True])
def test_counter_counts_storages_once_rounded_and_frees_them(fake):
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode, LiveStorageCounter() as counter:
        a = torch.empty(1000)                   # 4000 bytes -> 4096
        view = a[10:20]                         # same storage: no new bytes
        b = torch.ones(3, dtype=torch.float64)  # 24 bytes -> 512
        assert counter.live_bytes() == 4096 + ALLOCATOR_BLOCK_BYTES
        del a
        assert counter.live_bytes() == 4096 + ALLOCATOR_BLOCK_BYTES  # the view keeps the storage alive
        del view
        assert counter.live_bytes() == ALLOCATOR_BLOCK_BYTES
        c = torch.zeros(100)                    # fits under the earlier peak
        assert counter.peak_bytes == 4096 + ALLOCATOR_BLOCK_BYTES
        counter.reset_peak()
        assert counter.peak_bytes == 2 * ALLOCATOR_BLOCK_BYTES
        del b, c


def test_counter_reads_a_fake_scalar_as_one_and_a_real_one_as_itself():
    with FakeTensorMode(), LiveStorageCounter():
        assert float(torch.full((), 3.5)) == 1
    with LiveStorageCounter():
        assert float(torch.full((), 3.5)) == 3.5


@pytest.mark.parametrize("method", MEMORY_METHODS)
def test_fake_count_equals_the_count_over_real_tensors(method):
    """The FakeTensor run allocates what the real run allocates, op by op: same peak, same start."""
    figures = {fake: benchmark.memory_figures(method, "tiny", "tinylight", BATCH, BP_BATCH, NUM_CLASS,
                                              samples=SAMPLES, fake=fake)
               for fake in (False, True)}
    assert figures[True] == figures[False]
    assert figures[True]["peak_mb"] > figures[True]["at_start_mb"] > 0


def test_memory_section_reports_every_method_and_its_ratios(tmp_path):
    out = tmp_path / "memory.json"
    results = benchmark.main(["memory", "--config", "tiny", "--batch", "4", "--bp-batch", "2",
                              "--num-class", "3", "--json", str(out)])
    assert set(results) == set(MEMORY_METHODS)
    assert results["htuning"]["ft_over_this"] == results["ft"]["peak_mb"] / results["htuning"]["peak_mb"]
    assert results["ft"]["peak_mb"] > results["htuning"]["peak_mb"]
    assert results["infer_teacher_b1"]["peak_mb"] > results["infer_student_b1"]["peak_mb"]
    assert '"memory"' in out.read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_simulated_peak_is_within_five_percent_of_the_gpu_allocator_peak():
    results = benchmark.main(["memory", "--device", "cuda"])
    for method, row in results.items():
        assert row["gpu_over_simulated"] == pytest.approx(1.0, abs=0.05), method


@pytest.mark.parametrize("recompute", [True, False])
def test_memory_matched_backprop_holds_no_more_than_htuning_at_the_paper_scale(recompute):
    """lora_bp_accum backpropagates bp_batch samples at a time, as H-Tuning's FO pass does, and
    needs neither z, the copy of the ZO set, nor the whole batch's inference pass: at the paper's
    scale (medium, batch 128, bp_batch 8), both recomputing or neither, it holds at most what
    H-Tuning holds, and both far less than LoRA backprop on the whole batch."""
    import main
    from simulated_memory import training_peak_mb

    scale = main.PAPER_SCALE
    peaks = {method: training_peak_mb(main.step_config(zo_config=method, bp_batch=8, recompute=recompute),
                                      scale["config"], scale["batch"], scale["num_class"], main.r, main.weight_decay)
             for method in ("lora_bp", "lora_bp_accum", "htuning")}
    assert peaks["lora_bp_accum"] <= peaks["htuning"] < peaks["lora_bp"] / 4

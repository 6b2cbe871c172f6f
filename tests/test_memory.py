"""The simulated allocator (LiveStorageCounter) and the `memory` benchmark section built on it."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import bench_training
import benchmark
from helper_code import ALLOCATOR_BLOCK_BYTES, LiveStorageCounter

SAMPLES = 1024   # 16 tokens: every code path of the backbone, at a fraction of the cost
CONFIG = "tinylight"   # the smallest of the family: FakeTensor counts cost per op, and it has the fewest layers
NUM_CLASS = 5
BATCH, BP_BATCH = 6, 2
pytestmark = pytest.mark.usefixtures("one_thread")

MEMORY_METHODS = [*bench_training.MEMORY_STEP_METHODS,
                  *(f"infer_{role}_{size}" for role in ("teacher", "student") for size in ("b1", "bB"))]
# with CONFIG the student's config too, a teacher's inference row would count the student's again
COUNTED_METHODS = [m for m in MEMORY_METHODS if not m.startswith("infer_teacher_")]


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


@pytest.mark.parametrize("method", COUNTED_METHODS)
def test_fake_count_equals_the_count_over_real_tensors(method):
    """The FakeTensor run allocates what the real run allocates, op by op: same peak, same start."""
    figures = {fake: bench_training.memory_figures(method, CONFIG, "tinylight", BATCH, BP_BATCH, NUM_CLASS,
                                                   samples=SAMPLES, fake=fake)
               for fake in (False, True)}
    assert figures[True] == figures[False]
    assert figures[True]["peak_mb"] > figures[True]["at_start_mb"] > 0


def test_memory_section_reports_its_methods_and_their_ratios(tmp_path, monkeypatch):
    """The section's loop and ratios, over three of its methods (every method's count is checked
    above, through the same memory_figures)."""
    monkeypatch.setattr(bench_training, "MEMORY_STEP_METHODS", ("ft", "htuning", "lora_bp_accum:no_recompute"))
    out = tmp_path / "memory.json"
    results = benchmark.main(["memory", "--config", "tiny", "--batch", "4", "--bp_batch", "2",
                              "--num_class", "3", "--json", str(out)])
    assert set(results) == {"ft", "htuning", "lora_bp_accum:no_recompute",
                            *(m for m in MEMORY_METHODS if m.startswith("infer_"))}
    assert results["htuning"]["ft_over_this"] == results["ft"]["peak_mb"] / results["htuning"]["peak_mb"]
    assert results["ft"]["peak_mb"] > results["htuning"]["peak_mb"]
    assert results["infer_teacher_b1"]["peak_mb"] > results["infer_student_b1"]["peak_mb"]
    assert '"memory"' in out.read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_the_gpu_peak_lies_between_the_count_and_the_count_with_its_allowance():
    """The count leaves out scratch memory taken inside an op (cuBLAS and cuDNN workspaces), which
    an H200 measured at +1.5% for backprop and +24% for the no-grad passes: the GPU's peak is at
    least the count, and a training step's is within its GPU allowance (simulated_memory's table)
    give or take 5%."""
    from simulated_memory import gpu_allowance

    results = benchmark.main(["memory", "--device", "cuda"])
    for method, row in results.items():
        assert row["gpu_over_simulated"] >= 1.0, method
        if not method.startswith("infer_"):
            assert row["gpu_over_simulated"] <= gpu_allowance(method.partition(":")[0])[0] + 0.05, method


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


# ---------------------------------------------------------------------------------------------
# Will it fit: main.py --plan and the check at the start of a CUDA run
# ---------------------------------------------------------------------------------------------
def counted_plan(method, budget_mb, search=True):
    import main
    from simulated_memory import step_plan

    return step_plan(lambda bp: main.step_config(zo_config=method, bp_batch=bp), method, CONFIG, BATCH, BP_BATCH,
                     NUM_CLASS, bench_training.LORA_RANK, main.weight_decay, budget_mb, search, samples=SAMPLES)


@pytest.mark.parametrize("method", ["htuning", "lora_bp_accum", "zo", "ft"])
def test_the_plan_counts_what_the_memory_section_counts(method):
    plan = counted_plan(method, budget_mb=1e6, search=False)
    assert plan["peak_mb"] == bench_training.memory_figures(method, CONFIG, "tinylight", BATCH, BP_BATCH, NUM_CLASS,
                                                       samples=SAMPLES)["peak_mb"]
    assert plan["need_mb"] == plan["peak_mb"] * plan["gpu_ratio"] > plan["peak_mb"] and plan["fits"]
    assert "largest_bp_batch" not in plan and "largest_batch" not in plan   # nothing searched where it fits


@pytest.mark.parametrize("method", ["htuning", "lora_bp_accum", "ft", "hizoo", "sparse_mezo", "fzoo", "probe"])
def test_a_count_on_the_built_model_equals_a_count_from_scratch(method):
    """The plan's counter builds the model and its optimizer state once and counts one step per
    size: each of its counts must equal a fresh build's, at other batches and bp_batches too."""
    import main
    from simulated_memory import step_counter, training_peak_mb

    def config_at(bp):
        return main.step_config(zo_config=method, bp_batch=bp)

    sizes = [(BATCH + 3, BP_BATCH + 1), (BATCH - 2, 1)]   # both sizes other than the build's, larger then smaller
    with step_counter(config_at, CONFIG, BATCH, BP_BATCH, NUM_CLASS, bench_training.LORA_RANK, main.weight_decay,
                      SAMPLES) as peak_at:
        reused = [peak_at(batch, bp) for batch, bp in sizes]
    fresh = [training_peak_mb(config_at(bp), CONFIG, batch, NUM_CLASS, bench_training.LORA_RANK, main.weight_decay,
                              SAMPLES) for batch, bp in sizes]
    assert reused == fresh and len(set(fresh)) > 1


def test_the_largest_fitting_bp_batch_is_the_largest_within_the_budget():
    import main
    from simulated_memory import gpu_allowance, step_counter

    def config_at(bp):
        return main.step_config(zo_config="lora_bp_accum", bp_batch=bp)

    ratio, _ = gpu_allowance("lora_bp_accum")
    with step_counter(config_at, CONFIG, BATCH, BP_BATCH, NUM_CLASS, bench_training.LORA_RANK, main.weight_decay,
                      SAMPLES) as peak_at:   # a fresh build's counts (the test above)
        peaks = {bp: peak_at(BATCH, bp) * ratio for bp in (1, 2, 3, 4)}
    assert peaks[1] < peaks[2] < peaks[3] < peaks[4]
    budget = (peaks[3] + peaks[4]) / 2
    plan = counted_plan("lora_bp_accum", budget)
    assert plan["largest_bp_batch"] == 3                   # within the budget; one more is not
    assert plan["need_mb"] == peaks[BP_BATCH] and plan["fits"]
    assert "largest_batch" not in plan                     # accumulation's batch is not counted
    assert counted_plan("lora_bp_accum", peaks[1] * 0.99)["largest_bp_batch"] is None


def test_the_largest_fitting_batch_is_the_largest_within_the_budget():
    from simulated_memory import largest_fitting

    counts = []

    def peak_at(n):
        counts.append(n)
        return 100 + 3 * n + (n > 40) * 50               # close to affine, with a step: the search must not rely on it

    for budget in (99, 103, 219, 220, 276, 400, 1e6):
        counts.clear()
        expected = max((n for n in range(1, 2049) if peak_at(n) <= budget), default=None)
        counts.clear()
        assert largest_fitting(peak_at, budget, 1, 2048, {8: peak_at(8)}) == expected, budget
        assert len(counts) <= 12, (budget, counts)       # a handful of counts, not one per batch size


def test_the_plan_prints_every_method_without_touching_data(tmp_path, capsys):
    import main

    plan = main.main(["--plan", "--memory_budget", "150MiB", "--demo", "--demo_dir", str(tmp_path), "--batch_size",
                      "8", "--bp_batch", "2", "--zo_config", "compare", "--compare_methods", "zo", "lora_bp_accum"])
    out = capsys.readouterr().out
    assert set(plan) == {"zo", "lora_bp_accum"} and "memory plan: 150 MiB; tiny, batch 8, bp_batch 2" in out
    assert all(method in out for method in plan) and not list(tmp_path.iterdir())
    assert plan["zo"]["largest_batch"] is not None and plan["zo"]["fits"] == (plan["zo"]["need_mb"] <= 150)


def test_a_cuda_run_that_cannot_fit_stops_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import main
    import preflight

    touched = []
    monkeypatch.setattr(main, "prepare_demo", lambda *a: touched.append("demo") or pytest.fail("the check passed"))
    flags = ["--device", "cuda", "--demo", "--demo_dir", str(tmp_path), "--stage", "teacher", "--zo_config", "zo",
             "--batch_size", "8"]
    args = main.settings_from(main.build_parser(), flags)
    need = preflight.step_plan_of(args, main.step_config, "zo", "tiny", 1e6, search=False)["need_mb"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(need * 0.9 * 2**20), 80 * 2**30))
    with pytest.raises(SystemExit) as stop:
        main.main(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and not touched and not list(tmp_path.iterdir())
    assert len(err) == 1 and err[0].startswith("main.py: error: the zo step on tiny needs "), err
    assert f"{need:.0f} MiB" in err[0] and f"{need * 0.9:.0f} MiB free" in err[0] and "--batch_size " in err[0]
    largest = int(err[0].split("--batch_size ")[1].split(";")[0])
    assert 1 <= largest < 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    with pytest.raises(pytest.fail.Exception, match="the check passed"):   # room enough: on to the demo data
        main.main(flags)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("checked with --no-memory_guard"))
    with pytest.raises(pytest.fail.Exception, match="the check passed"):
        main.main([*flags, "--no-memory_guard"])

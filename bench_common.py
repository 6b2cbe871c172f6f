"""What benchmark.py's sections share: running one method per fresh process, timing calls, and
the input every model-level section feeds its models.

benchmark.py (the command line) imports the section modules (bench_training.py, bench_data.py,
bench_inference.py), and they import this; none of them imports benchmark.py.
"""
import json
import logging
from pathlib import Path

log = logging.getLogger("benchmark")

BENCHMARK_SCRIPT = Path(__file__).resolve().with_name("benchmark.py")   # what a fresh process runs
MODEL_SAMPLES = 6144
MODEL_NUM_CLASS = 16


def measure_in_fresh_processes(section_name, methods, options):
    """Run `benchmark.py SECTION --method M` for each method in its own process; merge the rows.

    A fresh process per method keeps one method's freed memory from hiding another's peak.
    """
    import subprocess
    import sys
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, method in enumerate(methods):
            out = Path(tmp) / f"method{index}.json"     # a method may name a file path
            log.info("%s: measuring %s", section_name, method)
            subprocess.run([sys.executable, str(BENCHMARK_SCRIPT), section_name, "--method", method,
                            *options, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            results.update(json.loads(out.read_text())[section_name])
    return results


def timed_calls(run, calls, device=None):
    """Seconds of each of `calls` calls of run(i) (i = 0, 1, ...), waiting for queued CUDA work
    before and after each so a GPU call is timed whole; also the last call's return value."""
    import time

    import torch

    def sync():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    times, value = [], None
    for i in range(calls):
        sync()
        start = time.perf_counter()
        value = run(i)
        sync()
        times.append(time.perf_counter() - start)
    return times, value

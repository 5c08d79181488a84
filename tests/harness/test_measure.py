"""harness.measure: memory monitor (NVML faked, no GPU needed), step timer (fake clock), cost and factors.

No test here times anything real: timers run on a fake clock and the NVML poller on a fake module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import torch

from harness.measure import (
    SUMMARY_KEYS,
    UNKNOWN_DEVICE_BASIS,
    MemoryMonitor,
    StepTimer,
    cost_summary,
    load_factors,
    lookup_factor,
)
from harness.measure import timing as timing_mod

MB = 1 << 20
PROCESS_KEYS = set(SUMMARY_KEYS)


# --------------------------------------------------------------------------- fake NVML
class FakeNVMLError(Exception):
    pass


class NVMLError_NotSupported(FakeNVMLError):
    def __str__(self):
        return "Not Supported"


def fake_pynvml(used: int = 1000 * MB):
    """A stand-in ``pynvml``: ``m.state.used`` (device bytes) and ``m.state.procs`` ([(pid, bytes|None)])
    are what the next poll sees; ``m.state.fail_memory`` / ``fail_procs`` make those calls raise, and
    ``fail_memory_after = n`` makes every memory call after the n-th raise."""
    m = types.ModuleType("pynvml")
    m.state = types.SimpleNamespace(used=used, procs=[], inits=0, shutdowns=0, memory_calls=0,
                                    fail_memory=False, fail_memory_after=None, fail_procs=False,
                                    polled=threading.Event())
    m.NVMLError = FakeNVMLError

    def init():
        m.state.inits += 1

    def shutdown():
        m.state.shutdowns += 1

    def memory_info(handle):
        assert handle == ("fake-handle", 0)
        m.state.memory_calls += 1
        if m.state.memory_calls > 3:
            m.state.polled.set()
        after = m.state.fail_memory_after
        if m.state.fail_memory or (after is not None and m.state.memory_calls > after):
            raise FakeNVMLError("GPU is lost")
        return types.SimpleNamespace(used=m.state.used, total=80 << 30, free=(80 << 30) - m.state.used)

    def procs(handle):
        if m.state.fail_procs:
            raise NVMLError_NotSupported()
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in m.state.procs]

    m.nvmlInit, m.nvmlShutdown = init, shutdown
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: ("fake-handle", i)
    m.nvmlDeviceGetMemoryInfo = memory_info
    m.nvmlDeviceGetComputeRunningProcesses = procs
    return m


@pytest.fixture
def nvml(monkeypatch):
    """The fake module installed as ``pynvml``; torch sees no CUDA so the monitor takes the index path."""
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return fake


def quiet_monitor(device="cuda:0", **kw) -> MemoryMonitor:
    """A monitor whose thread stays asleep: the test drives samples with poll_now()."""
    return MemoryMonitor(device, poll_interval_s=3600, **kw)


# --------------------------------------------------------------------------- NVML unavailable
def test_cpu_device_uses_rss_and_never_touches_nvml(nvml):
    with MemoryMonitor("cpu", poll_interval_s=0.01) as mon:
        pass
    s = mon.summary()
    assert set(s) == PROCESS_KEYS
    assert s["nvml_status"].startswith("unavailable: device is cpu")
    assert s["memory_source"] == "process_rss" and s["peak_memory_bytes"] == s["rss_peak_bytes"] > 0
    assert s["allocator_peak_bytes"] is None and s["nvml_device_peak_bytes"] is None
    assert s["num_alloc_retries"] is None
    assert nvml.state.inits == 0 and nvml.state.memory_calls == 0


def test_import_failure_falls_back_cleanly(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with quiet_monitor("cuda:0") as mon:
        pass
    s = mon.summary()
    assert set(s) == PROCESS_KEYS
    assert s["nvml_status"].startswith("unavailable: ") and "Error" in s["nvml_status"]
    assert s["memory_source"] == "process_rss" and s["peak_memory_bytes"] == s["rss_peak_bytes"]
    assert s["nvml_device_peak_bytes"] is None and s["nvml_process_peak_bytes"] is None


def test_library_not_found_falls_back_cleanly(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with quiet_monitor("cuda:0") as mon:
        pass
    s = mon.summary()
    assert s["nvml_status"].startswith("unavailable: NVMLError_LibraryNotFound")
    assert s["memory_source"] == "process_rss" and s["peak_memory_bytes"] > 0


def test_cuda_allocator_is_the_source_without_nvml(monkeypatch):
    """torch.cuda faked: the reserved peak is THE peak, retries are counted from start()."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    stats = {"num_alloc_retries": 4}
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d=None: dict(stats))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 300 * MB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 512 * MB)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", d)))
    mon = quiet_monitor("cuda").start()
    stats["num_alloc_retries"] = 7
    s = mon.stop()
    assert calls == [("reset", torch.device("cuda", 1)), ("sync", torch.device("cuda", 1))]
    assert s["memory_source"] == "cuda_allocator" and s["peak_memory_bytes"] == 512 * MB
    assert s["allocator_peak_bytes"] == 300 * MB and s["reserved_peak_bytes"] == 512 * MB
    assert s["num_alloc_retries"] == 3
    assert s["nvml_status"].startswith("unavailable: ")


def test_package_imports_without_pynvml():
    code = ("import sys; sys.modules['pynvml'] = None\n"
            "from harness.measure import MemoryMonitor\n"
            "m = MemoryMonitor('cpu'); m.start(); s = m.stop()\n"
            "assert s['memory_source'] == 'process_rss', s\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)


# --------------------------------------------------------------------------- RSS
def test_rss_peak_grows_with_a_big_array():
    with MemoryMonitor("cpu", poll_interval_s=0.01) as mon:
        before = mon.summary()["rss_peak_bytes"]
        a = np.ones(200 * MB // 8)  # 200 MiB, every page written
        del a
        after = mon.summary()["rss_peak_bytes"]
    assert after - before > 150 * MB
    assert mon.summary()["rss_peak_bytes"] >= after  # a peak: freeing the array does not lower it
    assert mon.summary()["rss_with_children_peak_bytes"] >= after


def test_nested_monitor_does_not_erase_the_outer_peak():
    with MemoryMonitor("cpu", poll_interval_s=3600) as outer:
        a = np.ones(200 * MB // 8)
        high = outer.summary()["rss_peak_bytes"]
        del a
        with MemoryMonitor("cpu", poll_interval_s=3600) as inner:  # resets the kernel's peak
            pass
    assert inner.summary()["rss_peak_bytes"] < high - 100 * MB
    assert outer.summary()["rss_peak_bytes"] >= high


def test_children_rss_and_gpu_memory_are_counted(nvml):
    child = subprocess.Popen(["sleep", "30"])
    try:
        mon = quiet_monitor(children_refresh_s=0.0).start()
        nvml.state.procs = [(os.getpid(), 300 * MB), (child.pid, 200 * MB), (999_999_999, 5000 * MB)]
        mon.poll_now()
        s = mon.stop()
    finally:
        child.kill()
        child.wait()
    assert child.pid in mon.details()["children_seen"]
    assert s["nvml_process_peak_bytes"] == 500 * MB  # ours + the child's, not the stranger's
    assert s["rss_with_children_peak_bytes"] >= s["rss_peak_bytes"]


# --------------------------------------------------------------------------- NVML poller (fake)
def test_per_process_peak_is_the_source_when_our_pid_is_visible(nvml):
    mon = quiet_monitor().start()
    for used, ours in [(3000, 500), (2500, 800), (2000, 200)]:
        nvml.state.used = used * MB
        nvml.state.procs = [(os.getpid(), ours * MB), (4242, 1234 * MB)]
        mon.poll_now()
    s = mon.stop()
    assert s["nvml_status"] == "ok" and s["memory_source"] == "nvml_process"
    assert s["nvml_process_peak_bytes"] == s["peak_memory_bytes"] == 800 * MB
    assert s["nvml_device_peak_bytes"] == 3000 * MB
    assert s["allocator_peak_bytes"] is None  # torch.cuda unavailable in this test
    assert nvml.state.inits == nvml.state.shutdowns == 1


@pytest.mark.parametrize("procs, fail_procs, why", [
    ([(4242, 700 * MB)], False, "process not visible"),
    ([(os.getpid(), None)], False, "per-process usedGpuMemory not available"),
    ([], True, "process list failed: NVMLError_NotSupported: Not Supported"),
])
def test_device_minus_baseline_when_the_process_cannot_be_attributed(nvml, procs, fail_procs, why):
    nvml.state.used = 1000 * MB  # baseline at start
    mon = quiet_monitor().start()
    nvml.state.procs, nvml.state.fail_procs = procs, fail_procs
    for used in (1800, 2600, 1200):
        nvml.state.used = used * MB
        mon.poll_now()
    s = mon.stop()
    assert s["nvml_status"] == f"ok (device-wide minus baseline: {why})"
    assert s["memory_source"] == "nvml_device_minus_baseline"
    assert s["peak_memory_bytes"] == 1600 * MB and s["nvml_device_peak_bytes"] == 2600 * MB
    assert s["nvml_process_peak_bytes"] is None
    assert mon.details()["nvml_baseline_used_bytes"] == 1000 * MB


def test_poll_errors_are_recorded_not_raised(nvml):
    mon = quiet_monitor().start()
    nvml.state.procs = [(os.getpid(), 100 * MB)]
    nvml.state.fail_memory = True
    mon.poll_now()
    mon.poll_now()
    nvml.state.fail_memory = False
    s = mon.stop()
    assert s["nvml_status"].startswith("ok; 2 poll error(s), first: FakeNVMLError: GPU is lost")
    assert s["memory_source"] == "nvml_process" and s["peak_memory_bytes"] == 100 * MB


def test_nvml_that_never_answers_falls_back_to_rss(nvml):
    nvml.state.fail_memory_after = 1  # the baseline read at start works, every poll after it fails
    mon = quiet_monitor().start()
    mon.poll_now()
    s = mon.stop()
    assert s["nvml_status"].startswith("error: every NVML poll failed")
    assert s["memory_source"] == "process_rss"


def test_the_thread_polls_on_its_own_and_restarts_cleanly(nvml):
    for _ in range(2):  # start/stop twice: NVML opened and closed once per run
        mon = MemoryMonitor("cuda:0", poll_interval_s=0.001).start()
        assert nvml.state.polled.wait(timeout=5.0), "poller thread never sampled"
        mon.stop()
        nvml.state.polled.clear()
        nvml.state.memory_calls = 0
    assert nvml.state.inits == nvml.state.shutdowns == 2
    assert not any(t.name == "mdh-memory-poller" for t in threading.enumerate())


def test_monitor_misuse_is_reported():
    with pytest.raises(ValueError, match="poll_interval_s"):
        MemoryMonitor("cpu", poll_interval_s=0)
    mon = MemoryMonitor("cpu")
    with pytest.raises(RuntimeError, match="before start"):
        mon.summary()
    with mon, pytest.raises(RuntimeError, match="already running"):
        mon.start()
    assert mon.stop() == mon.summary()  # second stop is a no-op


# --------------------------------------------------------------------------- StepTimer (fake clock)
class FakeClock:
    """perf_counter stand-in: each measured step lasts the next of ``durations`` seconds."""

    def __init__(self, durations):
        self.now, self.durations, self.pending = 100.0, list(durations), None

    def __call__(self):
        if self.pending is None:  # start of a step
            self.pending = self.durations.pop(0)
            return self.now
        self.now += self.pending  # end of a step
        self.pending = None
        return self.now


def run_steps(timer, monkeypatch, durations):
    monkeypatch.setattr(timing_mod.time, "perf_counter", FakeClock(durations))
    return [(timer.start(), timer.stop())[1] for _ in durations]


def test_step_timer_excludes_warmup_and_summarises(monkeypatch):
    timer = StepTimer(warmup_steps=2)
    got = run_steps(timer, monkeypatch, [10.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert got == timer.times == [10.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    s = timer.summary()
    assert s["steps_timed"] == 5 and s["warmup_steps"] == 2 and s["steps_measured"] == 7
    assert s["step_time_median_s"] == 3.0 and s["step_time_mean_s"] == 3.0
    assert s["step_time_p90_s"] == pytest.approx(4.6)  # linear interpolation between 4 and 5


def test_step_timer_shorter_than_warmup_reports_none(monkeypatch):
    timer = StepTimer(warmup_steps=5)
    run_steps(timer, monkeypatch, [1.0, 1.0])
    s = timer.summary()
    assert s["steps_timed"] == 0 and s["step_time_median_s"] is None and s["step_time_p90_s"] is None


def test_step_timer_resume_treats_first_steps_as_warmup_again(monkeypatch):
    first = StepTimer(warmup_steps=1)
    run_steps(first, monkeypatch, [50.0, 2.0, 2.0])
    state = first.state_dict()
    resumed = StepTimer(warmup_steps=1)
    resumed.load_state_dict(state)
    run_steps(resumed, monkeypatch, [40.0, 4.0])
    assert resumed.times == [50.0, 2.0, 2.0, 40.0, 4.0]
    assert resumed.timed == [2.0, 2.0, 4.0]
    assert resumed.summary()["segments"] == 2 and resumed.summary()["step_time_median_s"] == 2.0
    with pytest.raises(ValueError, match="segment_starts"):
        StepTimer().load_state_dict({"times": [1.0], "segment_starts": [0, 5]})


def test_step_timer_synchronises_cuda_at_both_ends(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    timer = StepTimer(warmup_steps=0, device="cuda:0")
    monkeypatch.setattr(timing_mod.time, "perf_counter", FakeClock([1.0, 1.0]))
    timer.start(), timer.stop()
    assert len(calls) == 2
    cpu = StepTimer(device="cpu")
    cpu.start(), cpu.stop()
    assert len(calls) == 2


def test_step_timer_misuse(monkeypatch):
    timer = StepTimer()
    with pytest.raises(RuntimeError, match="without start"):
        timer.stop()
    timer.start()
    with pytest.raises(RuntimeError, match="twice"):
        timer.start()
    with pytest.raises(ValueError, match="warmup_steps"):
        StepTimer(warmup_steps=-1)
    monkeypatch.setattr(timing_mod.time, "perf_counter", FakeClock([3.0, 7.0]))
    timer = StepTimer(warmup_steps=0)
    with timer.step():
        pass
    with pytest.raises(KeyError), timer.step():
        raise KeyError("boom")  # a failed step is not recorded
    assert timer.times == [3.0]


# --------------------------------------------------------------------------- factors and cost
@pytest.mark.parametrize("name, factor", [
    ("Tesla V100-SXM2-16GB", 1.00), ("Tesla V100-PCIE-32GB", 1.00),
    ("NVIDIA GeForce RTX 3090", 1.22), ("NVIDIA RTX A6000", 1.41),
    ("NVIDIA RTX 6000 Ada Generation", 1.90), ("NVIDIA GeForce RTX 4090", 1.96),
    ("NVIDIA A100-PCIE-40GB", 2.20), ("NVIDIA A100-SXM4-80GB", 2.64),
    ("NVIDIA H100 PCIe", 3.17), ("NVIDIA H100 80GB HBM3", 4.42), ("nvidia h100 80gb hbm3", 4.42),
])
def test_factor_lookup_for_known_gpus(name, factor):
    row = lookup_factor(name)
    assert row is not None and row.factor == factor and row.source_url.startswith("https://")


@pytest.mark.parametrize("name", [
    "NVIDIA H200", "NVIDIA L40S", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe",
    "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D", "Tesla V100S-PCIE-32GB", "Quadro RTX 6000",
    "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "", "cpu",
])
def test_no_factor_is_invented(name):
    assert lookup_factor(name) is None


def test_packaged_table_is_versioned_and_says_where_h100_hbm3_goes():
    table = load_factors()
    assert table.version and len(table) == 9
    h100 = lookup_factor("NVIDIA H100 80GB HBM3", table)
    assert "H100 80GB HBM3" in h100.basis


def test_v100_day_arithmetic():
    s = cost_summary("cuda", "NVIDIA A100-SXM4-80GB", 2, wall_time_s=5 * 3600, median_step_s=0.36,
                     recipe_steps=100_000)
    assert s["gpu_hours"] == pytest.approx(10.0) and s["cpu_hours"] is None
    assert s["factor"] == 2.64 and s["factor_source"].startswith("https://")
    assert s["v100_days"] == pytest.approx(10 * 2.64 / 24)
    assert s["v100x8_days"] == pytest.approx(10 * 2.64 / 24 / 8)
    assert s["projected_recipe_hours"] == pytest.approx(0.36 * 100_000 / 3600 * 2)  # 20 GPU-hours
    assert s["projected_recipe_v100_days"] == pytest.approx(20 * 2.64 / 24)
    assert s["projected_recipe_v100x8_days"] == pytest.approx(20 * 2.64 / 24 / 8)
    assert s["factor_table_version"] == load_factors().version


def test_cpu_never_gets_a_v100_figure():
    s = cost_summary("cpu", "x86_64 (2 threads)", 1, wall_time_s=7200, median_step_s=0.5, recipe_steps=7200)
    assert s["cpu_hours"] == pytest.approx(2.0) and s["gpu_hours"] is None
    assert s["projected_recipe_hours"] == pytest.approx(1.0)
    for key in ("factor", "factor_source", "v100_days", "v100x8_days", "projected_recipe_v100_days",
                "projected_recipe_v100x8_days"):
        assert s[key] is None, key
    # even a GPU's name on a CPU run gets nothing
    assert cost_summary("cpu", "NVIDIA A100-SXM4-80GB", 1, 3600, None, None)["v100_days"] is None


def test_unknown_gpu_keeps_hours_and_no_v100_figure():
    s = cost_summary("cuda", "NVIDIA H200", 1, wall_time_s=3600, median_step_s=None, recipe_steps=None)
    assert s["gpu_hours"] == pytest.approx(1.0) and s["factor"] is None
    assert s["factor_basis"] == UNKNOWN_DEVICE_BASIS and s["factor_source"] is None
    assert s["v100_days"] is None and s["projected_recipe_hours"] is None


def test_cost_inputs_are_validated():
    with pytest.raises(ValueError, match="device_count"):
        cost_summary("cuda", "NVIDIA H100 PCIe", 0, 10.0, None, None)
    with pytest.raises(ValueError, match="wall_time_s"):
        cost_summary("cuda", "NVIDIA H100 PCIe", 1, float("nan"), None, None)
    with pytest.raises(ValueError, match="recipe_steps"):
        cost_summary("cuda", "NVIDIA H100 PCIe", 1, 10.0, 0.1, 2.5)


GOOD_HEADER = "# version: test-1\ndevice_pattern,factor_vs_v100,basis,source_url,date\n"
GOOD_ROW = "\\bFoo 9000\\b,1.5,measured,https://example.org/x,2024-01-02\n"


@pytest.mark.parametrize("row, column", [
    ("\\bFoo,abc,measured,https://example.org,2024-01-02\n", "factor_vs_v100"),
    ("\\bFoo,-1,measured,https://example.org,2024-01-02\n", "factor_vs_v100"),
    ("Foo(,1.2,measured,https://example.org,2024-01-02\n", "device_pattern"),
    ("Foo,1.2,,https://example.org,2024-01-02\n", "basis"),
    ("Foo,1.2,measured,example.org,2024-01-02\n", "source_url"),
    ("Foo,1.2,measured,https://example.org,02/01/2024\n", "date"),
    ("Foo,1.2,measured,https://example.org\n", "*"),
])
def test_bad_csv_row_names_file_line_and_column(tmp_path, row, column):
    path = tmp_path / "factors.csv"
    path.write_text(GOOD_HEADER + GOOD_ROW + "\n" + row)  # the bad row is line 5
    with pytest.raises(ValueError) as err:
        load_factors(path)
    assert str(err.value).startswith(f"{path}: line 5, column '{column}'")


def test_csv_needs_version_and_header(tmp_path):
    path = tmp_path / "factors.csv"
    path.write_text("device_pattern,factor_vs_v100,basis,source_url,date\n" + GOOD_ROW)
    with pytest.raises(ValueError, match="version"):
        load_factors(path)
    path.write_text("# version: 1\npattern,factor\n" + GOOD_ROW)
    with pytest.raises(ValueError, match="line 2.*header"):
        load_factors(path)
    path.write_text(GOOD_HEADER + GOOD_ROW)
    table = load_factors(path)
    assert table.version == "test-1" and lookup_factor("ACME FOO 9000", table).factor == 1.5
    assert cost_summary("cuda", "ACME Foo 9000", 1, 48 * 3600, None, None, factors=table)["v100_days"] == 3.0

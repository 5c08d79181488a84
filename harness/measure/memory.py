"""Peak memory of a run: an NVML poller (GPU), the CUDA allocator's peaks, and process RSS (always).

``MemoryMonitor`` wraps the part of a run to measure (``with MemoryMonitor(device) as mon: ...``) and
``summary()`` returns every figure in bytes plus which one is THE peak of the run (``memory_source``):

1. ``nvml_process``: NVML's per-process ``usedGpuMemory`` summed over this PID and its children, peaked
   by a background thread. Closest to what ``nvidia-smi`` shows for the run (allocator reserve + CUDA
   context + cuBLAS workspaces + non-PyTorch allocations).
2. ``nvml_device_minus_baseline``: device-wide used memory minus its value when the monitor started, when
   NVML runs but cannot attribute memory to us (container PID namespaces hide our PID, or the driver
   reports ``usedGpuMemory`` as not available). Other processes on the same GPU leak into this figure,
   and memory we held before ``start()`` is not counted: start the monitor before the model is moved to
   the GPU.
3. ``cuda_allocator``: ``torch.cuda.max_memory_reserved`` (the caching allocator's peak hold, a lower
   bound of 1.) when NVML is unavailable.
4. ``process_rss``: the peak resident set size of this process (CPU runs, or no CUDA at all).

NVML only reports instantaneous values, so polled peaks miss spikes shorter than ``poll_interval_s``; the
allocator peaks are exact, which is why all figures are reported. ``pynvml`` (the ``nvidia-ml-py``
distribution) is imported lazily: this module imports, and every monitor works, on machines without it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref

import psutil
import torch

try:  # Unix only; on other systems the RSS peak comes from the poller's samples
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

MEMORY_SOURCES = ("nvml_process", "nvml_device_minus_baseline", "cuda_allocator", "process_rss")
SUMMARY_KEYS = (
    "allocator_peak_bytes", "reserved_peak_bytes", "nvml_device_peak_bytes", "nvml_process_peak_bytes",
    "rss_peak_bytes", "rss_with_children_peak_bytes", "num_alloc_retries", "nvml_status", "memory_source",
    "peak_memory_bytes",
)

# nvmlInit/nvmlShutdown are reference-counted by NVML; the lock only keeps pynvml's own bookkeeping tidy
# when monitors in several threads open and close it at once.
_NVML_LOCK = threading.Lock()


def describe_error(err: BaseException) -> str:
    """``"<ExceptionType>: <message>"``, e.g. ``"NVMLError_LibraryNotFound: NVML Shared Library Not Found"``."""
    try:
        msg = str(err)
    except Exception:  # noqa: BLE001 - an NVMLError whose __str__ itself needs NVML
        msg = repr(err)
    return f"{type(err).__name__}: {msg}"


def nvml_open():
    """Import ``pynvml`` and call ``nvmlInit()``.

    Returns ``(pynvml_module, "ok")`` or ``(None, "unavailable: <why>")``; never raises. Safe to call
    repeatedly and from any thread: each successful call must be paired with one ``nvml_close``.
    """
    try:
        import pynvml
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken install
        return None, f"unavailable: {describe_error(err)}"
    try:
        with _NVML_LOCK:
            pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound (no driver), DriverNotLoaded, OSError...
        return None, f"unavailable: {describe_error(err)}"
    return pynvml, "ok"


def nvml_close(pynvml) -> None:
    """``nvmlShutdown()`` for one successful ``nvml_open``; never raises."""
    try:
        with _NVML_LOCK:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001, S110 - closing must never fail a run
        pass


def _cuda_initialized() -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as "not initialised"
        return False


def nvml_handle(pynvml, device: torch.device):
    """NVML handle of a CUDA ``device`` and how it was found: ``(handle, "uuid" | "pci_bus_id" | ...)``.

    CUDA and NVML may number GPUs differently (``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER``), so when
    CUDA is already initialised match by UUID, then PCI bus id; otherwise (reading device properties
    would create a CUDA context, which must not happen before the NVML baseline is read) use torch's
    CUDA_VISIBLE_DEVICES translation. The raw index is the last resort. Raises whatever NVML raises when
    no handle can be had (e.g. no GPU at all).
    """
    index = device.index if device.index is not None else 0
    if int(pynvml.nvmlDeviceGetCount()) < 1:
        raise RuntimeError("NVML sees no GPU")
    if _cuda_initialized():
        try:
            props = torch.cuda.get_device_properties(index)
        except Exception:  # noqa: BLE001 - no properties: match by index below
            props = None
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-"))
                                                        else f"GPU-{text}"), "uuid"
            except Exception:  # noqa: BLE001, S110 - try the next way
                pass
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            domain, dev = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0"), "pci_bus_id"
            except Exception:  # noqa: BLE001, S110 - try the next way
                pass
    to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)  # private API: guarded
    if to_nvml is not None and torch.cuda.is_available():
        try:
            return pynvml.nvmlDeviceGetHandleByIndex(int(to_nvml(index))), "cuda_visible_devices"
        except Exception:  # noqa: BLE001, S110 - try the raw index
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index), "index (assumed NVML index == CUDA index)"


def maxrss_bytes() -> int | None:
    """The kernel's peak RSS of this process in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS), or None
    where ``resource`` does not exist (Windows). The one RSS-peak reader, used by ``MemoryMonitor`` (which
    ``mdh train`` and ``mdh bench step`` both measure with)."""
    if resource is None:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024




def _reset_kernel_rss_peak() -> str | None:
    """Reset this process's peak RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs). None on success,
    else why not."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        return describe_error(err)
    return None


# Monitors between start() and stop(): a nested start() resets the kernel's RSS peak, so it first hands
# the peak so far to every running monitor.
_ACTIVE: weakref.WeakSet[MemoryMonitor] = weakref.WeakSet()
_ACTIVE_LOCK = threading.Lock()


class MemoryMonitor:
    """Peak memory between ``start()`` and ``stop()`` (also a context manager); figures in bytes.

    ``device``: the run's torch device. NVML and the CUDA allocator are read only for CUDA devices; every
    device gets the process RSS. ``poll_interval_s``: period of the background poller (NVML + children's
    RSS). Extra keywords: ``track_children`` (poll the RSS of child processes, e.g. DataLoader workers),
    ``children_refresh_s`` (how often the child list is re-scanned; scanning reads all of /proc),
    ``reset_rss_peak`` (reset the kernel's peak RSS at start so ``rss_peak_bytes`` covers only the
    monitored window; Linux only, otherwise it is the peak since process start, see ``details()``).

    ``summary()`` may be called while running (peaks so far) or after ``stop()`` (frozen). The poller
    never raises into the run: NVML errors are counted and reported in ``nvml_status``. Always stop a
    started monitor (or use ``with``): the poller thread and the NVML reference live until ``stop()``.
    """

    def __init__(self, device: torch.device | str = "cpu", poll_interval_s: float = 0.02, *,
                 track_children: bool = True, children_refresh_s: float = 1.0, reset_rss_peak: bool = True):
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0 seconds, got {poll_interval_s!r}")
        self.device = torch.device(device)
        self.poll_interval_s = float(poll_interval_s)
        self.track_children = bool(track_children)
        self.children_refresh_s = float(children_refresh_s)
        self.reset_rss_peak = bool(reset_rss_peak)
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._started = False
        self._clear()

    # ------------------------------------------------------------------ lifecycle
    def _clear(self) -> None:
        self._pynvml = None
        self._handle = None
        self._handle_by = None
        self._nvml_status = "not started"
        self._nvml_baseline: int | None = None
        self._nvml_device_peak: int | None = None
        self._nvml_process_peak: int | None = None
        self._nvml_samples = 0
        self._nvml_errors = 0
        self._nvml_first_error: str | None = None
        self._proc_seen = False
        self._proc_mem_unavailable = False
        self._proc_list_error: str | None = None
        self._proc_fn = None
        self._children: dict[int, psutil.Process] = {}
        self._children_seen: set[int] = set()
        self._children_at = float("-inf")
        self._rss_sum_peak: int | None = None
        self._own_rss_sample_peak: int | None = None
        self._rss_carry = 0
        self._rss_scope = "since process start"
        self._rss_final: int | None = None
        self._cuda_ok = False
        self._alloc_peak: int | None = None
        self._reserved_peak: int | None = None
        self._retries: int | None = None
        self._retries0 = 0
        self._notes: list[str] = []

    def start(self) -> MemoryMonitor:
        """Reset the peaks, open NVML (CUDA devices), take a first sample and start the poller."""
        if self._running:
            raise RuntimeError("MemoryMonitor.start() called while already running; call stop() first")
        self._clear()
        self._started = True
        self._stop_event.clear()
        if self.device.type == "cuda" and self.device.index is None:
            # current_device() would create a CUDA context; an uninitialised process is on device 0
            self.device = torch.device("cuda", torch.cuda.current_device() if _cuda_initialized() else 0)
        self._start_rss()
        if self.device.type == "cuda":
            self._start_nvml()  # first: the baseline must not include a context the allocator reset creates
            self._start_allocator()
        else:
            self._nvml_status = f"unavailable: device is {self.device.type} (NVML is polled only for CUDA devices)"
        self._process = psutil.Process()
        self._running = True
        self.poll_now()
        self._thread = threading.Thread(target=self._loop, name="mdh-memory-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop the poller, take a last sample, freeze every figure, close NVML; returns ``summary()``.
        Calling it again is a no-op."""
        if not self._running:
            return self.summary()
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 10 * self.poll_interval_s))
            if self._thread.is_alive():
                self._notes.append("poller thread did not stop within the timeout")
            self._thread = None
        if self.device.type == "cuda" and self._cuda_ok:
            try:  # let queued kernels finish so the last NVML sample sees their memory
                torch.cuda.synchronize(self.device)
            except Exception as err:  # noqa: BLE001 - measurement must not fail a run
                self._notes.append(f"cuda synchronize at stop failed: {describe_error(err)}")
        self.poll_now()
        with self._lock:
            self._read_allocator()
            self._rss_final = self._rss_peak_now()
            self._running = False
            if self._pynvml is not None:
                nvml_close(self._pynvml)
                self._pynvml = None
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self)
        return self.summary()

    def __enter__(self) -> MemoryMonitor:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ start helpers
    def _start_rss(self) -> None:
        with _ACTIVE_LOCK:
            current = maxrss_bytes() or 0
            for other in list(_ACTIVE):
                other._rss_carry = max(other._rss_carry, current)
            why_not = _reset_kernel_rss_peak() if self.reset_rss_peak else "reset_rss_peak=False"
            _ACTIVE.add(self)
        self._rss_scope = "since monitor start" if why_not is None else f"since process start ({why_not})"

    def _start_allocator(self) -> None:
        if not torch.cuda.is_available():
            self._notes.append("torch.cuda is not available: no allocator figures")
            return
        try:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._retries0 = int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))
            self._cuda_ok = True
        except Exception as err:  # noqa: BLE001 - measurement must not fail a run
            self._notes.append(f"cuda allocator statistics unavailable: {describe_error(err)}")

    def _start_nvml(self) -> None:
        pynvml, status = nvml_open()
        if pynvml is None:
            self._nvml_status = status
            return
        try:
            self._handle, self._handle_by = nvml_handle(pynvml, self.device)
            self._nvml_baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception as err:  # noqa: BLE001 - measurement must not fail a run
            nvml_close(pynvml)
            self._nvml_status = f"unavailable: {describe_error(err)}"
            return
        self._pynvml = pynvml
        self._proc_fn = pynvml.nvmlDeviceGetComputeRunningProcesses
        self._nvml_status = "ok"

    # ------------------------------------------------------------------ polling
    def _loop(self) -> None:
        while not self._stop_event.wait(self.poll_interval_s):
            self.poll_now()

    def poll_now(self) -> None:
        """Take one sample now (the poller calls this every ``poll_interval_s``); never raises."""
        with self._lock:
            if not self._running:
                return
            try:
                self._sample_rss()
            except Exception as err:  # noqa: BLE001 - the poller never raises into the run
                self._notes.append(f"rss poll failed: {describe_error(err)}")
            if self._pynvml is not None:
                self._sample_nvml()

    def _refresh_children(self) -> None:
        try:
            kids = self._process.children(recursive=True)
        except psutil.Error:
            kids = []
        self._children = {p.pid: self._children.get(p.pid, p) for p in kids}
        self._children_seen.update(self._children)
        self._children_at = time.monotonic()

    def _sample_rss(self) -> None:
        own = int(self._process.memory_info().rss)
        self._own_rss_sample_peak = max(own, self._own_rss_sample_peak or 0)
        total = own
        if self.track_children:
            if time.monotonic() - self._children_at >= self.children_refresh_s:
                self._refresh_children()
            for pid, proc in list(self._children.items()):
                try:
                    total += int(proc.memory_info().rss)
                except psutil.Error:  # the worker exited between scans
                    self._children.pop(pid, None)
        self._rss_sum_peak = max(total, self._rss_sum_peak or 0)

    def _nvml_error(self, err: BaseException) -> None:
        self._nvml_errors += 1
        if self._nvml_first_error is None:
            self._nvml_first_error = describe_error(err)

    def _sample_nvml(self) -> None:
        pynvml = self._pynvml
        try:
            used = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception as err:  # noqa: BLE001 - NVMLError (GPU lost, timeout...): record it, keep the run going
            self._nvml_error(err)
        else:
            self._nvml_samples += 1
            self._nvml_device_peak = max(used, self._nvml_device_peak or 0)
        try:
            procs = self._proc_fn(self._handle)
        except Exception as err:  # noqa: BLE001 - NVMLError or NVMLLibraryMismatchError: record it
            name = type(err).__name__
            v2 = getattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v2", None)
            if name in ("NVMLLibraryMismatchError", "NVMLError_FunctionNotFound") and v2 is not None \
                    and self._proc_fn is not v2:
                self._proc_fn = v2  # an older driver without the _v3 call
            else:
                self._proc_list_error = describe_error(err)
            return
        self._proc_list_error = None  # the latest call decides why we cannot attribute memory
        ours_pids = {os.getpid(), *self._children}
        ours = [p for p in procs if getattr(p, "pid", None) in ours_pids]
        if not ours:
            return
        self._proc_seen = True
        values = [int(p.usedGpuMemory) for p in ours if getattr(p, "usedGpuMemory", None) is not None]
        if values:
            self._nvml_process_peak = max(sum(values), self._nvml_process_peak or 0)
        else:
            self._proc_mem_unavailable = True

    # ------------------------------------------------------------------ results
    def _read_allocator(self) -> None:
        if not self._cuda_ok:
            return
        try:
            self._alloc_peak = int(torch.cuda.max_memory_allocated(self.device))
            self._reserved_peak = int(torch.cuda.max_memory_reserved(self.device))
            retries = int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))
            self._retries = retries - self._retries0
        except Exception as err:  # noqa: BLE001 - measurement must not fail a run
            self._notes.append(f"cuda allocator read failed: {describe_error(err)}")

    def _rss_peak_now(self) -> int | None:
        kernel = maxrss_bytes()
        if kernel is None:
            return self._own_rss_sample_peak
        return max(kernel, self._rss_carry)

    def _nvml_result(self) -> tuple[str, str | None, int | None]:
        """(nvml_status, memory_source or None, peak bytes or None) from the NVML figures."""
        status = self._nvml_status
        if not status.startswith("ok"):
            return status, None, None
        errors = ""
        if self._nvml_errors:
            errors = f"; {self._nvml_errors} poll error(s), first: {self._nvml_first_error}"
        if self._nvml_samples == 0:
            return f"error: every NVML poll failed{errors}", None, None
        if self._nvml_process_peak is not None:
            return "ok" + errors, "nvml_process", self._nvml_process_peak
        if self._proc_list_error is not None:
            why = f"process list failed: {self._proc_list_error}"
        elif self._proc_mem_unavailable:
            why = "per-process usedGpuMemory not available"
        else:
            why = "process not visible"
        peak = max(0, self._nvml_device_peak - (self._nvml_baseline or 0))
        return f"ok (device-wide minus baseline: {why}){errors}", "nvml_device_minus_baseline", peak

    def summary(self) -> dict:
        """Every figure in bytes (None where it does not apply); keys in ``SUMMARY_KEYS``.

        ``memory_source`` names which figure is THE peak of the run and ``peak_memory_bytes`` is it;
        ``nvml_status`` is ``"ok"``, ``"ok (device-wide minus baseline: <why>)"`` or
        ``"unavailable: <why>"``. ``rss_with_children_peak_bytes`` is the polled peak of (our RSS + the
        children's RSS), at least ``rss_peak_bytes``; shared pages of forked workers count once per process,
        so it over-counts and is never THE peak.
        """
        if not self._started:
            raise RuntimeError("MemoryMonitor.summary() before start()")
        with self._lock:
            if self._running:
                self._read_allocator()
                rss = self._rss_peak_now()
            else:
                rss = self._rss_final
            with_children = self._rss_sum_peak
            if rss is not None:
                with_children = max(rss, with_children or 0)
            status, source, peak = self._nvml_result()
            if source is None and self._reserved_peak is not None:
                source, peak = "cuda_allocator", self._reserved_peak
            if source is None:
                source, peak = "process_rss", rss
            return {
                "allocator_peak_bytes": self._alloc_peak,
                "reserved_peak_bytes": self._reserved_peak,
                "nvml_device_peak_bytes": self._nvml_device_peak,
                "nvml_process_peak_bytes": self._nvml_process_peak,
                "rss_peak_bytes": rss,
                "rss_with_children_peak_bytes": with_children,
                "num_alloc_retries": self._retries,
                "nvml_status": status,
                "memory_source": source,
                "peak_memory_bytes": peak,
            }

    def details(self) -> dict:
        """Diagnostics behind ``summary()``: how the NVML device was found, the baseline (bytes), sample and
        error counts, the scope of the RSS peak, child PIDs seen, and free-text notes."""
        with self._lock:
            return {
                "device": str(self.device),
                "poll_interval_s": self.poll_interval_s,
                "nvml_handle_by": self._handle_by,
                "nvml_baseline_used_bytes": self._nvml_baseline,
                "nvml_samples": self._nvml_samples,
                "nvml_poll_errors": self._nvml_errors,
                "nvml_first_error": self._nvml_first_error,
                "nvml_process_seen": self._proc_seen,
                "rss_peak_scope": self._rss_scope,
                "children_seen": sorted(self._children_seen),
                "notes": list(self._notes),
            }

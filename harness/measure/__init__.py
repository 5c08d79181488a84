"""Measurement of a training run: peak memory, step time, and cost normalised to V100-days.

- ``MemoryMonitor`` (memory.py): NVML poller + CUDA allocator peaks + process RSS; ``summary()`` in bytes.
- ``StepTimer`` (timing.py): per-step seconds, warm-up excluded, CUDA-synchronised, resumable.
- ``cost_summary`` (cost.py): GPU-/CPU-hours and V100-days from the versioned ``gpu_factors.csv``.
"""

from harness.measure.cost import (
                                  DEFAULT_FACTORS_PATH,
                                  UNKNOWN_DEVICE_BASIS,
                                  FactorTable,
                                  GpuFactor,
                                  cost_summary,
                                  load_factors,
                                  lookup_factor,
)
from harness.measure.memory import MEMORY_SOURCES, SUMMARY_KEYS, MemoryMonitor
from harness.measure.timing import StepTimer

__all__ = [
    "DEFAULT_FACTORS_PATH", "MEMORY_SOURCES", "SUMMARY_KEYS", "UNKNOWN_DEVICE_BASIS", "FactorTable", "GpuFactor",
    "MemoryMonitor", "StepTimer", "cost_summary", "load_factors", "lookup_factor",
]

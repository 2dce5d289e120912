"""Peak memory of a code region (`PeakMemory`): CUDA tensor memory, else the process's peak RSS."""
from __future__ import annotations

import resource
import sys

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """Peak memory of a code region, in MiB.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory of the
      caching allocator; kind ``"cuda_max_allocated"``).
    * CPU (Linux): the process's peak resident set size (``VmHWM``), reset at the start of the region by
      writing ``5`` to ``/proc/self/clear_refs`` (kind ``"cpu_peak_rss"``). It includes everything the
      process holds (Python, libraries, the model, the data), not only tensors.
    * Elsewhere: ``resource.getrusage`` max RSS over the whole process lifetime
      (kind ``"cpu_peak_rss_lifetime"``), an upper bound of the region's peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""

    def start(self) -> None:
        """Reset the peak counter where possible."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "cpu_peak_rss"
        except OSError:
            self.kind = "cpu_peak_rss_lifetime"

    def peak_mb(self) -> float:
        """Peak since ``start`` (see the class docstring for what is measured)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss":
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024.0  # kB -> MiB
            except OSError:
                pass
            self.kind = "cpu_peak_rss_lifetime"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, kB on Linux

"""What this machine can hold: the memory a run may use, read before a size the user asked for is
allocated, so that an absurd size (a 10^7-wide model, a corpus of 10^9 documents) is refused in one
line instead of failing inside an allocator.

Linux: ``MemAvailable`` of ``/proc/meminfo`` (what can be allocated without swapping), capped by a
cgroup v2 ``memory.max`` (a container's limit); elsewhere the free physical pages. A GPU: the free
memory the CUDA driver reports. Unknown: ``None``, and nothing is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

GIB = 2**30


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit, or None when there is no limit."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a new allocation on ``device`` can take, or None when this cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    room = [m for m in (_meminfo_available(), _cgroup_room()) if m is not None]
    return min(room) if room else None


def too_big(need: float, device: torch.device | str = "cpu") -> str | None:
    """None when ``need`` bytes fit ``device``'s available memory (or it is unknown), else the phrase
    'needs ~X GiB, more than the Y GiB available on DEVICE'."""
    room = available_memory(device)
    if room is None or need <= room:
        return None
    return f"needs ~{need / GIB:.3g} GiB, more than the {room / GIB:.3g} GiB available on {torch.device(device)}"

"""How big a job's VM is: one rule for the node that boots it (vmwrap/request.py) and the gap planner
that must fit its save into a gap before the VM exists (vmwrap_plugins/*/planner.py).

The size is the job's own request, else its image's default, else the site's; never its allocation,
which is only a ceiling (checked where the allocation is known: vmwrap/request.py)."""

from __future__ import annotations

import os

from .catalog import Image
from .config import Settings
from .directives import MIN_MEMORY_MIB  # noqa: F401  (the planners and restore check it here)


def memory_mib(requested: int | None, image: Image | None, settings: Settings) -> tuple[int, str]:
    """The VM's memory in MiB and where it came from, in words an error message can quote."""
    if requested:
        return requested, f"--memory={requested}M"
    if image is not None and image.memory_mib:
        return image.memory_mib, f"image {image.name}'s default memory of {image.memory_mib}M"
    if image is not None and image.max_memory_mib and settings.default_memory_mib > image.max_memory_mib:
        return image.max_memory_mib, f"image {image.name}'s max_memory of {image.max_memory_mib}M"
    return settings.default_memory_mib, f"the site's default VM memory of {settings.default_memory_mib}M"


def cpus(requested: int | None, allocated: int | None, image: Image | None, settings: Settings) -> int:
    """The VM's CPUs: the request, else what the scheduler allocated, else the image's, else the site's.
    Only a request is refused above the image's max_cpus (Image.check_size); the others are capped."""
    n = requested or allocated or (image.cpus if image is not None else None) or settings.default_cpus
    if not requested and image is not None and image.max_cpus:
        n = min(n, image.max_cpus)
    return n


def host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)

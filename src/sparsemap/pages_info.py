"""The machine's page size, the unit in which memory is mapped, freed and counted. No torch."""

from __future__ import annotations

import mmap

PAGE_SIZE: int = mmap.PAGESIZE

"""``lora-cl reproduce``: the honest reproduction grid on real data, cached cell by cell.

Cells (stream, method, seed, config hash) are :func:`~lora_cl.trainer.stream.run_method` runs
under ``<cache>/<stream>/<cfg-hash>/<method>-s<seed>/``; finished ones are skipped, so the grid
completes across sessions. :func:`write_report` regenerates ``docs/reproduction.md`` from them.
"""

from lora_cl.reproduce.doc import DEFAULT_CACHE, write_report
from lora_cl.reproduce.grid import METHODS, PARTS, STREAMS, Cell, Settings, default_settings, part_cells
from lora_cl.reproduce.runner import run_grid
from lora_cl.reproduce.stats import mean_ci, paired

__all__ = ["DEFAULT_CACHE", "METHODS", "PARTS", "STREAMS", "Cell", "Settings", "default_settings",
           "mean_ci", "paired", "part_cells", "run_grid", "write_report"]

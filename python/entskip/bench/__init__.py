"""``entskip.bench``: entskip's fused skip-add timed beside its peers (docs/performance.md, "Method").

Run ``python -m entskip.bench`` (``--help`` for the options, ``--quick`` for a grid that
finishes in under a minute on two CPU cores). For ``N x D`` inputs, block sizes,
block densities and dtypes it times, forward and forward+backward, in one run on one
device: ``entskip.skip_add`` with a sparse mapping ("entskip bsr") and, at density 1,
with a dense orthogonal one ("entskip dense"); the eager ``alpha * (x @ M.T) + r``;
one ``torch.addmm``; ``torch.sparse`` BSR addmm; ``torch.compile`` of the eager
expression; and the plain ``x + r``. It prints a table (median time, ratio to
``x + r``, ratio to the best peer, fraction of the roofline floor), writes the raw
numbers as JSON with the machine, versions and date, and draws a PNG beside it.

Modules: :mod:`~entskip.bench.cases` (the grid, inputs, mappings),
:mod:`~entskip.bench.peers` (the methods), :mod:`~entskip.bench.timing`,
:mod:`~entskip.bench.roofline` (floor and machine numbers), :mod:`~entskip.bench.sweep`
(the run), :mod:`~entskip.bench.report` (table, JSON), :mod:`~entskip.bench.plot`,
:mod:`~entskip.bench.cli`.
"""

from .cli import main

__all__ = ["main"]

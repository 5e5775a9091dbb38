"""``python -m entskip.bench``: see :mod:`entskip.bench`."""

from .cli import main

main()

"""``python -m fastclr ...`` (and ``torchrun -m fastclr pretrain ...``): the same as the ``fastclr`` command."""

from fastclr.cli import main

raise SystemExit(main())

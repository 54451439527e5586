"""``python -m lineas_fast``: the ``lineas-fast`` command (as ``python -m lineas_fast.cli``)."""

from lineas_fast.cli import main

raise SystemExit(main())

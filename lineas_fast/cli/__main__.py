"""``python -m lineas_fast.cli``: the ``lineas-fast`` command."""

from lineas_fast.cli import main

raise SystemExit(main())

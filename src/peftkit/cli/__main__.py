"""`python -m peftkit.cli`: the command line (compare runs each method this way)."""

from peftkit.cli import main

raise SystemExit(main())

"""`python -m epreplay` is the same as the `epreplay` console script."""
from epreplay.cli import main

raise SystemExit(main())

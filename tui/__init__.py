"""epreplay.tui: the Textual app for interactive investigation of a run."""

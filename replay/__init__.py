"""epreplay.replay: coordinated replay of a recorded run on the same or fewer ranks."""

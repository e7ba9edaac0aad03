"""epreplay.capture: hooks at DeepEP's dispatch/combine, the async recorder, flight mode."""

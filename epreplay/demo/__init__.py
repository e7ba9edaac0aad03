"""epreplay.demo: workloads that drive DeepEP, for the `epreplay demo` command, tests and benches.

Owns the demo MoE (config, router, model, run, elastic), its record -> index -> replay pipeline
and summary (pipeline, render), DeepEP's benchmark call sequences (epbench) and synthetic
recordings written straight into shards (synth).
May import: every epreplay package below the command line (format, emulate, index, diff, capture,
replay) and torch; never textual nor epreplay.cli.
"""

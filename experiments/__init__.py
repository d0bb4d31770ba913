"""Everything that knows about Hydra, files and runs: pipeline, artifact store, aggregation, benchmarks."""

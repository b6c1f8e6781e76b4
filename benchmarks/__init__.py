"""layerstream's benchmarks: run from the repository (bin/bench), not installed with the package."""

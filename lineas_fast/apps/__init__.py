"""Applications built on the library: the demo, the quality sweep, their assets and metrics, image sweeps."""

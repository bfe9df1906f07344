"""The default grid of a tuning sweep, apart from the sweep itself so that the CLI can show it in
``--help`` without importing torch."""

DEFAULT_LMBDAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_TEMPERATURE_MULTIPLES = (0.03, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DEFAULT_TEMPERATURES = (1.0, 10.0)
DEFAULT_KS = (8, 32, 128, 512, 1024)
DEFAULT_MAX_CACHE_BYTES = 1 << 30

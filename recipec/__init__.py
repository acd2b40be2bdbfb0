"""recipec: a language, its compiler and its runtime for the data strategy of a vision-language model."""

__version__ = "0.1.0"

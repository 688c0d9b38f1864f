"""evidencemap: maps of evidence for convolutional networks."""

__version__ = "0.1.0"

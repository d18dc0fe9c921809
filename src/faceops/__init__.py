"""faceops: one pipeline from a face dataset to a served, measured (VLR) face recognizer."""

__version__ = "0.1.0"

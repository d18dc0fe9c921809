"""Base error: anything a user can fix. The CLI prints these as one clear line and exits non-zero."""


class FaceopsError(Exception):
    """An error whose message names the file/key/URI at fault and what to do."""


class TrainingError(FaceopsError):
    """Training cannot go on (NaN budget spent, no checkpoint to resume, a setting this run cannot honour)."""

"""``faceops train TASK`` under torchrun: the command line every launcher builds, and the one-node launcher.

On one node with N GPUs, :func:`run_torchrun` starts ``torchrun --standalone --nproc_per_node=N`` as a
child process and streams its output; a TrainJob (:mod:`faceops.train.cluster_job`) runs the same
module and arguments under torchrun in each pod. The training code knows nothing about either: the
engine joins the torchrun process group by itself (``WORLD_SIZE > 1``).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from faceops.errors import FaceopsError

log = logging.getLogger(__name__)

ENTRY_MODULE = "faceops"  # what torchrun runs: `python -m faceops train ...` (faceops/__main__.py)
# the first error a rank reports: the CLI's one-line error, or an uncaught exception's last line
RANK_ERROR = re.compile(r"^(faceops \w+: error: |[\w.]*(Error|Exception): )")


class LaunchError(FaceopsError):
    """Training could not be launched, or the launched training failed."""


def train_argv(task: str, config_file: str, overrides: list[str], resume: bool) -> list[str]:
    """``train TASK --config FILE --set k=v ... [--resume]`` (the ``faceops`` arguments)."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    return ["train", task, "--config", config_file, *sets, *(["--resume"] if resume else [])]


def torchrun_command(argv: list[str], nproc: int, python: str = sys.executable) -> list[str]:
    """Single-node torchrun running ``faceops ARGV`` in ``nproc`` processes."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", ENTRY_MODULE, *argv]


def run_torchrun(argv: list[str], nproc: int) -> int:
    """Run torchrun, streaming its output to stdout; a non-zero exit raises :class:`LaunchError`
    naming the first error a rank printed (torchrun's own summary only says a child failed)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise LaunchError(f"gpus_per_node={nproc} but this node has {torch.cuda.device_count()} CUDA "
                          "device(s): lower gpus_per_node or run on a bigger node")
    if not torch.cuda.is_available():
        log.warning("no CUDA device: running %d CPU processes (gloo) instead of %d GPUs", nproc, nproc)
    cmd = torchrun_command(argv, nproc)
    log.info("launching: %s", " ".join(cmd))
    cause: str | None = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout or ():
            sys.stdout.write(line)
            sys.stdout.flush()
            if cause is None and RANK_ERROR.match(line) and "ChildFailedError" not in line:
                cause = line.strip()
    rc = proc.returncode
    if rc != 0:
        where = f": {cause}" if cause else "; the failing rank's traceback is in the output above"
        raise LaunchError(f"torchrun with {nproc} processes of 'faceops {' '.join(argv[:2])}' exited with "
                          f"code {rc}{where}")
    return rc

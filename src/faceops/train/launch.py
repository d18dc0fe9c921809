"""Launch ``faceops train TASK`` in this process, on several GPUs of this node, or as a TrainJob.

One entry point, :func:`launch_training`. The backend comes from ``FACEOPS_TRAINING_BACKEND``, which
the pipeline sets on training steps from ``cluster.training_backend``:

- ``pod`` (default, and what runs outside a pipeline): in this pod or process; one GPU or none in
  process (``faceops.cli.main``), N GPUs as ``torchrun --standalone --nproc_per_node=N``
  (:mod:`faceops.train.torchrun`). ``nodes > 1`` is an error here.
- ``trainjob``: this step is a light launcher (its pod requests no GPU) that creates a Kubeflow
  Trainer ``TrainJob`` of ``nodes`` pods with ``gpus_per_node`` GPUs each, even for one node, and
  waits for it (:mod:`faceops.train.cluster_job`).

The training code knows nothing about this: the engine joins the torchrun process group by itself
(``WORLD_SIZE > 1``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from faceops import config
from faceops.cli import main
from faceops.train.cluster_job import BACKENDS, TRAINING_BACKEND_ENV, JobConfig, job_config_from_yaml, run_trainjob
from faceops.train.registry import get_task
from faceops.train.torchrun import LaunchError, run_torchrun, train_argv

BACKEND_ENV = TRAINING_BACKEND_ENV  # "pod" | "trainjob", set by the pipeline (cluster.training_backend)


def training_backend(env: dict[str, str] | None = None) -> str:
    """The backend named by ``FACEOPS_TRAINING_BACKEND`` ("pod" when unset)."""
    value = ((os.environ if env is None else env).get(BACKEND_ENV) or "pod").strip().lower()
    if value not in BACKENDS:
        raise LaunchError(f"{BACKEND_ENV}={value!r} is not a training backend; use one of {', '.join(BACKENDS)} "
                          "(cluster.training_backend in the cluster config)")
    return value


def launch_training(task: str, config_yaml: str, overrides: list[str], *, gpus_per_node: int = 0,
                    nodes: int = 1, resume: bool = False, job: JobConfig | None = None,
                    backend: str | None = None) -> int:
    """Run ``faceops train TASK`` with the config YAML text ``config_yaml`` and ``--set`` overrides.

    ``backend``: "pod" or "trainjob"; None reads ``FACEOPS_TRAINING_BACKEND``. Returns the exit code
    (0 on success). In-process runs return the CLI's code; torchrun and TrainJob failures raise
    :class:`LaunchError` naming the exit code or the job's reason.
    """
    get_task(task)  # an unknown task fails here, listing the known ones
    if nodes < 1 or gpus_per_node < 0:
        raise LaunchError(f"nodes must be >= 1 and gpus_per_node >= 0, got nodes={nodes}, "
                          f"gpus_per_node={gpus_per_node}")
    config.parse_yaml(config_yaml or "", "<config>")
    backend = training_backend() if backend is None else training_backend({BACKEND_ENV: backend})
    if backend == "trainjob":
        job = job or job_config_from_yaml(config_yaml)
        return run_trainjob(task, config_yaml, overrides, gpus_per_node=gpus_per_node, nodes=nodes,
                            resume=resume, job=job)
    if nodes > 1:
        raise LaunchError(f"nodes={nodes} needs training on the cluster: set cluster.training_backend: "
                          f"trainjob in the cluster config (outside a pipeline: {BACKEND_ENV}=trainjob with "
                          "a kubeconfig), or train on one node")
    with tempfile.TemporaryDirectory(prefix="faceops-launch-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(config_yaml or "")
        argv = train_argv(task, str(config_file), overrides, resume)
        if gpus_per_node <= 1:
            return main(argv)
        return run_torchrun(argv, gpus_per_node)

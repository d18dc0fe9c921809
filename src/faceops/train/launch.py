"""Launch ``faceops train TASK`` on one process, on several GPUs of this node, or on several nodes.

One entry point, :func:`launch_training`, chosen by the size of the job:

- one node, at most one GPU: in this process (``faceops.cli.main``);
- one node, N GPUs: ``torchrun --standalone --nproc_per_node=N`` as a child process
  (:mod:`faceops.train.torchrun`);
- several nodes: a Kubeflow ``PyTorchJob``, one pod per node, each running ``torchrun``
  (:mod:`faceops.train.cluster_job`).

The training code knows nothing about this: the engine joins the torchrun process group by itself
(``WORLD_SIZE > 1``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from faceops import config
from faceops.cli import main
from faceops.train.cluster_job import JobConfig, job_config_from_yaml, run_pytorchjob
from faceops.train.registry import get_task
from faceops.train.torchrun import LaunchError, run_torchrun, train_argv


def launch_training(task: str, config_yaml: str, overrides: list[str], *, gpus_per_node: int = 0,
                    nodes: int = 1, resume: bool = False, job: JobConfig | None = None) -> int:
    """Run ``faceops train TASK`` with the config YAML text ``config_yaml`` and ``--set`` overrides.

    Returns the exit code (0 on success). In-process runs return the CLI's code; torchrun and
    PyTorchJob failures raise :class:`LaunchError` naming the exit code or the job's reason.
    """
    get_task(task)  # an unknown task fails here, listing the known ones
    if nodes < 1 or gpus_per_node < 0:
        raise LaunchError(f"nodes must be >= 1 and gpus_per_node >= 0, got nodes={nodes}, "
                          f"gpus_per_node={gpus_per_node}")
    config.parse_yaml(config_yaml or "", "<config>")
    if nodes > 1:
        job = job or job_config_from_yaml(config_yaml)
        return run_pytorchjob(task, config_yaml, overrides, gpus_per_node=gpus_per_node, nodes=nodes,
                              resume=resume, job=job)
    with tempfile.TemporaryDirectory(prefix="faceops-launch-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(config_yaml or "")
        argv = train_argv(task, str(config_file), overrides, resume)
        if gpus_per_node <= 1:
            return main(argv)
        return run_torchrun(argv, gpus_per_node)


"""``faceops run`` (local), ``faceops compile`` and ``faceops submit`` (Kubeflow Pipelines)."""

from __future__ import annotations

import argparse
import json

from faceops.cli._common import add_config_args
from faceops.config import ConfigError
from faceops.pipelines import PIPELINES


def _param(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. --param vlr_sizes=14x16")
        out[key] = value
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a pipeline end to end on this machine (kfp local runner)",
        description="Runs PIPELINE through kfp's local SubprocessRunner with a local folder as the store: "
        "the same components as on a cluster. Without --data it trains on synthetic faces. Prints each step "
        "as it starts and ends with its key figures, and where the report, metrics, model repository and logs "
        "are; the runner's whole output (executor input/output, warnings) goes to <out>/logs/kfp.log (-v: "
        "to the console as well). With --param store_uri=s3://BUCKET the outputs go to the bucket "
        "(FACEOPS_S3_* from the environment) and the report is copied to <out>/report.")
    p.add_argument("pipeline", choices=sorted(PIPELINES))
    add_config_args(p, None, "recognizer.engine.epochs=3")
    p.add_argument("--data", metavar="DIR", help="a folder with one sub-folder per identity (default: synthetic)")
    p.add_argument("--pairs", metavar="FILE", help="an LFW pairs file to import with --data")
    p.add_argument("--out", metavar="DIR", help="output folder (default faceops-runs/<pipeline>-<time>)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. --param vlr_sizes=14x16")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show the runner's whole output as well (as `faceops -v run`)")
    p.set_defaults(func=run)

    c = sub.add_parser("compile", help="compile a pipeline to KFP v2 YAML",
                       description="Compile PIPELINE with the cluster settings (GPU placement, Secret, "
                       "caching, retries) of --cluster (section 'cluster:'; defaults: CPU-only).")
    c.add_argument("pipeline", choices=sorted(PIPELINES))
    c.add_argument("-o", "--output", required=True, metavar="FILE")
    c.add_argument("--cluster", metavar="FILE", help="YAML with a 'cluster:' section (see configs/cluster_gpu.yaml)")
    c.set_defaults(func=compile_)

    s = sub.add_parser("submit", help="submit a pipeline run to Kubeflow Pipelines",
                       description="Compile and submit PIPELINE through kfp.Client. Auth: --token or "
                       "KF_PIPELINES_TOKEN, else in-cluster/kubeconfig credentials. MinIO credentials are "
                       "never parameters: steps read them from the Kubernetes Secret.")
    s.add_argument("pipeline", choices=sorted(PIPELINES))
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
    s.add_argument("--namespace")
    s.add_argument("--experiment")
    s.add_argument("--run-name")
    s.add_argument("--token", help="bearer token (prefer KF_PIPELINES_TOKEN)")
    s.add_argument("--cluster", metavar="FILE", help="YAML with a 'cluster:' section")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter (repeatable), e.g. --param source=s3://faces/lfw")
    s.set_defaults(func=submit)


def run(args: argparse.Namespace) -> int:
    from faceops.run import run_local

    result = run_local(args.pipeline, config_file=args.config, overrides=args.overrides, data=args.data,
                       pairs=args.pairs, out=args.out, params=_param(args.param),
                       verbose=getattr(args, "verbose", False))
    print(f"\nfaceops run {args.pipeline}: done\n{result.summary()}")
    metrics = result.local_metrics()
    if metrics:
        from faceops.evaluate.runner import summary_table

        print("\n" + summary_table(json.loads(metrics.read_text())))
    return 0


def compile_(args: argparse.Namespace) -> int:
    from faceops.run import compile_pipeline

    print(f"wrote {compile_pipeline(args.pipeline, args.output, args.cluster)}")
    return 0


def submit(args: argparse.Namespace) -> int:
    from faceops.run import submit as submit_run

    run_id = submit_run(args.pipeline, args.host, namespace=args.namespace, experiment=args.experiment,
                        run_name=args.run_name, params=_param(args.param), cluster_file=args.cluster,
                        token=args.token)
    print(f"submitted {args.pipeline}: run id {run_id}")
    return 0

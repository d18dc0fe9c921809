"""``faceops run`` (local), ``faceops compile`` and ``faceops submit`` (Kubeflow Pipelines)."""

from __future__ import annotations

import argparse
import json
import sys

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
        "(FACEOPS_S3_* from the environment) and the report is copied to <out>/report. Each run is a new "
        "run (its id, printed first, names its folder <store>/runs/<id>); --param run_id=ID resumes run ID. "
        "Models are served only when the evaluation meets the config's promote thresholds.")
    p.add_argument("pipeline", choices=sorted(PIPELINES))
    add_config_args(p, None, "recognizer.engine.epochs=3")
    p.add_argument("--data", metavar="DIR", help="a folder with one sub-folder per identity (default: synthetic)")
    p.add_argument("--pairs", metavar="FILE", help="an LFW pairs file to import with --data")
    p.add_argument("--out", metavar="DIR", help="output folder (default faceops-runs/<pipeline>-<time>)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. --param vlr_sizes=14x16, --param run_id=ID (resume run ID)")
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

    s = sub.add_parser("submit", help="submit a pipeline run to Kubeflow Pipelines (--wait: and follow it)",
                       description="Compile and submit PIPELINE through kfp.Client and print the run's page in "
                       "the KFP UI. --wait follows the run: each step's state as it changes, then the final state, "
                       "failed steps with their errors, and the metrics (read from the store when FACEOPS_S3_* are "
                       "set here; else their URIs). Exit code with --wait: 0 succeeded, 1 failed/canceled/skipped, "
                       "124 --timeout passed, 130 Ctrl-C (the run goes on in every case but a failure). Auth: --token "
                       "or KF_PIPELINES_TOKEN, else in-cluster/kubeconfig credentials. MinIO credentials are never "
                       "parameters: steps read them from the Kubernetes Secret.")
    s.add_argument("pipeline", choices=sorted(PIPELINES))
    _add_api_args(s)
    s.add_argument("--experiment")
    s.add_argument("--run-name")
    s.add_argument("--cluster", metavar="FILE", help="YAML with a 'cluster:' section")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter (repeatable), e.g. --param source=s3://faces/lfw")
    s.add_argument("--wait", action="store_true", help="follow the run until it ends")
    _add_follow_args(s)
    s.set_defaults(func=submit)

    f = sub.add_parser("follow", help="follow a submitted Kubeflow Pipelines run (as `submit --wait`)",
                       description="Follow run RUN_ID until it ends, as `faceops submit --wait` does; exit codes "
                       "as there.")
    f.add_argument("run_id", metavar="RUN_ID")
    _add_api_args(f)
    _add_follow_args(f)
    f.set_defaults(func=follow)


def _add_api_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True,
                   help="KFP API endpoint with its scheme, e.g. http://ml-pipeline.kubeflow:8888 (the run's UI "
                   "link uses KF_PIPELINES_UI_ENDPOINT when set)")
    p.add_argument("--namespace", help="the Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--token", help="bearer token (prefer KF_PIPELINES_TOKEN: a flag shows in the process list)")


def _add_follow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop following after this long (exit 124; the run goes on)")
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between two looks at the run (default 10)")


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
    from faceops.submit import submit as submit_run

    if args.timeout is not None and not args.wait:
        raise ConfigError("--timeout applies to --wait: add --wait, or leave --timeout out")
    run = submit_run(args.pipeline, args.host, namespace=args.namespace, experiment=args.experiment,
                     run_name=args.run_name, params=_param(args.param), cluster_file=args.cluster,
                     token=args.token)
    print(f"submitted {args.pipeline}: run id {run.run_id}\n  {run.link}", flush=True)
    if not args.wait:
        return 0
    return _follow(run.client, run.run_id, run.link, args)


def follow(args: argparse.Namespace) -> int:
    from faceops.submit import connect, run_link

    client = connect(args.host, namespace=args.namespace, token=args.token)
    link = run_link(args.host, args.run_id)
    print(f"following run {args.run_id}\n  {link}", flush=True)
    return _follow(client, args.run_id, link, args)


def _follow(client, run_id: str, link: str, args: argparse.Namespace) -> int:
    """Follow until the run ends; Ctrl-C and --timeout stop following, never the run."""
    from faceops.submit import FollowTimeout, finish, safe_url
    from faceops.submit import follow as follow_run

    if args.interval <= 0 or (args.timeout is not None and args.timeout <= 0):
        raise ConfigError(f"--interval {args.interval:g} / --timeout {args.timeout}: give a number of seconds > 0")
    again = f"faceops follow {run_id} --host {safe_url(args.host)}" + (
        f" --namespace {args.namespace}" if args.namespace else "")

    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        run = follow_run(client, run_id, interval_s=args.interval, timeout_s=args.timeout, echo=echo)
    except FollowTimeout as exc:
        print(f"faceops {args.command}: {exc}\n  {link}\n  follow it again: {again}", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        print(f"\nfaceops {args.command}: stopped following; run {run_id} goes on\n  {link}\n"
              f"  follow it again: {again}", file=sys.stderr)
        return 130
    return finish(run, link, echo)

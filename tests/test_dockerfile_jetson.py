"""Dockerfile.jetson and the Jetson runtime's pinned requirements (requirements/jetson-*.txt).

Static checks of the image recipe: what it copies exists and is only what the package needs; its
base image and build arguments agree with the JetPack 6 targets; it runs as a non-root user with
``jei-edge`` as entry point; it never installs torch, onnxruntime or a PyPI tensorrt. Of the pins:
exact, free of those packages, covering setup.py's requirements, cuda-python of the JetPack's CUDA
major. And one check that needs the package index: every pin resolves to a wheel the board can
install (aarch64, the JetPack's Python and glibc), and those wheels require nothing left unpinned
(the image installs with ``--no-deps``). Without the index that check skips, saying why.

Nothing here builds the image: that needs a Jetson (docs/jetson.md).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.jetson"
REQUIREMENTS = ROOT / "requirements"
JETPACKS = ("6", "7")

# what `pip install --no-deps .` needs (setup.py reads README.md; targets/ and calibration/ become
# package data), and nothing else may be copied (no tests, runs, benchmarks, virtualenvs)
PACKAGE_PATHS = {"setup.py", "pyproject.toml", "README.md", "jei_edge", "targets", "calibration", "requirements"}
# never in the Jetson runtime: the build side's heavy packages, and TensorRT from PyPI (JetPack's own)
FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|onnx|onnxruntime.*|tensorrt.*|nvidia-tensorrt.*|polygraphy)$")

# pip's messages when it cannot reach the index (then the download check skips instead of failing)
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "nodename nor servname", "Network is unreachable", "Connection refused",
               "ConnectTimeoutError", "Read timed out", "ProxyError", "Could not fetch URL", "SSLError",
               "Max retries exceeded", "No route to host", "connection broken by")


# ---- parsing --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> List[Tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs of a Dockerfile: continuation lines joined, comments dropped."""
    out: List[Tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue  # blank and comment lines go even inside a continued instruction, as in Docker
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1]
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


def arg_defaults(instructions) -> Tuple[Dict[str, str], Dict[str, str]]:
    """ARG defaults declared before the first FROM and after it (the build stage's)."""
    before: Dict[str, str] = {}
    after: Dict[str, str] = {}
    seen_from = False
    for kw, args in instructions:
        if kw == "FROM":
            seen_from = True
        elif kw == "ARG":
            name, _, default = args.partition("=")
            target = after if seen_from else before
            target[name.strip()] = default.strip().strip('"') if default else target.get(name.strip(), "")
    return before, after


def copy_sources(instructions) -> List[str]:
    """The build-context paths COPY/ADD instructions take (not ``--from`` another stage)."""
    out = []
    for kw, args in instructions:
        if kw not in ("COPY", "ADD"):
            continue
        tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [t for t in tokens if t.startswith("--")]
        assert not any(f.startswith("--from") for f in flags), "no multi-stage copies expected"
        paths = [t for t in tokens if not t.startswith("--")]
        assert len(paths) >= 2, f"{kw} {args}: needs a source and a destination"
        out.extend(paths[:-1])
    return out


def shell_commands(instructions) -> List[str]:
    """The single shell commands of every RUN (split at ;, &&, ||, | and newlines)."""
    out = []
    for kw, args in instructions:
        if kw == "RUN":
            out.extend(c.strip() for c in re.split(r"&&|\|\||;|\||\n", args) if c.strip())
    return out


def requirement_lines(path: Path) -> List[Tuple[str, Path]]:
    """Requirement strings of a requirements file, ``-r`` includes followed (relative to the file)."""
    out: List[Tuple[str, Path]] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            out.extend(requirement_lines(path.parent / line.split(None, 1)[1]))
            continue
        assert not line.startswith("-"), f"{path.name}: only requirements and -r includes, not {line!r}"
        out.append((line, path))
    return out


def board_env(python: str) -> Dict[str, str]:
    """Marker environment of a Jetson board with this CPython (``extra`` empty: no extras)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "implementation_version": f"{python}.0",
            "platform_machine": "aarch64", "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
            "platform_release": "", "platform_version": "", "extra": ""}


def pins(jetpack: str, python: str) -> Dict[str, Requirement]:
    """The requirements of ``requirements/jetson-jp<jetpack>.txt`` that apply on the board, by name."""
    out: Dict[str, Requirement] = {}
    for line, source in requirement_lines(REQUIREMENTS / f"jetson-jp{jetpack}.txt"):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in out, f"{name} pinned twice (second in {source.name})"
        if req.marker is None or req.marker.evaluate(board_env(python)):
            out[name] = req
    return out


def pinned_version(req: Requirement) -> Version:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, \
        f"{req}: not an exact pin (name==version)"
    return Version(specs[0].version)


def jetpack_toolchains() -> Dict[str, Dict[str, Set[str]]]:
    """For each JetPack major, the CUDA, TensorRT and Python versions its targets name."""
    out: Dict[str, Dict[str, Set[str]]] = {}
    for path in sorted((ROOT / "targets").glob("*.toml")):
        tc = tomllib.loads(path.read_text()).get("toolchain", {})
        if "jetpack" not in tc:
            continue
        listed = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
        majors = {j.split(".")[0] for j in listed(tc["jetpack"])}
        assert len(majors) == 1, f"{path.name}: one JetPack major per target"
        entry = out.setdefault(majors.pop(), {"cuda": set(), "tensorrt": set(), "python": set()})
        for key in entry:
            entry[key].update(listed(tc[key]))
    return out


def setup_requirements() -> Tuple[List[str], List[str]]:
    """setup.py's install_requires and its ``cuda`` extra, read without running setup.py."""
    text = (ROOT / "setup.py").read_text()
    install = re.search(r"install_requires=(\[[^\]]*\])", text)
    cuda = re.search(r"^cuda = (\[[^\]]*\])", text, re.M)
    assert install and cuda, "setup.py: install_requires / cuda extra not found"
    return ast.literal_eval(install.group(1)), ast.literal_eval(cuda.group(1))


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def toolchains():
    tc = jetpack_toolchains()
    assert set(tc) == set(JETPACKS), f"targets name JetPacks {sorted(tc)}, requirements cover {JETPACKS}"
    return tc


def python_of(toolchains, jetpack: str) -> str:
    (python,) = toolchains[jetpack]["python"]
    return python


# ---- the image recipe -----------------------------------------------------------------------


def test_copies_exist_and_are_only_what_the_package_needs(instructions):
    sources = copy_sources(instructions)
    for src in sources:
        assert not any(c in src for c in "*?["), f"COPY {src}: explicit paths only (there is no .dockerignore)"
        path = ROOT / src
        assert path.exists(), f"COPY {src}: no such file or folder in the repository"
        if src.endswith("/"):
            assert path.is_dir(), f"COPY {src}: not a folder"
    top = {Path(s).parts[0] for s in sources}
    assert top == PACKAGE_PATHS, f"copied {sorted(top)}; the package needs exactly {sorted(PACKAGE_PATHS)}"
    # setup.py's data folders (package_dir) are all copied
    package_dir = ast.literal_eval(re.search(r"package_dir=(\{[^}]*\})", (ROOT / "setup.py").read_text()).group(1))
    assert set(package_dir.values()) <= top


def test_base_image_and_build_arguments_match_the_jetpack6_targets(instructions, toolchains):
    before, after = arg_defaults(instructions)
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, FROM the BASE_IMAGE build argument"
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-(jetpack|tensorrt):r36\.\d+\.\d+(-\w+)?", before["BASE_IMAGE"]), \
        f"default base {before['BASE_IMAGE']!r} is not an NGC L4T r36 (JetPack 6) image"
    jp6 = toolchains["6"]
    assert after["JETPACK"] == "6"
    assert {c.split(".")[0] for c in jp6["cuda"]} == {after["CUDA_MAJOR"]}, "CUDA_MAJOR vs targets/*-jp6.toml"
    assert jp6["tensorrt"] == {after["TENSORRT_VERSION"]}, "TENSORRT_VERSION vs targets/*-jp6.toml"
    assert re.fullmatch(r"r36\.\d+", after["L4T_APT"])
    assert after["CHECK_TENSORRT"] == "1"


def test_requirements_file_of_every_jetpack_is_the_one_installed(instructions):
    installs = [c for c in shell_commands(instructions) if re.search(r"\bpip3? install\b", c)]
    assert installs, "no pip install in the Dockerfile"
    for cmd in installs:
        assert "--no-deps" in cmd.split(), f"{cmd!r}: every pip install is --no-deps (nothing unpinned comes in)"
    req_args = [re.search(r"-r\s+\"?([^\s\"]+)", c) for c in installs]
    paths = [m.group(1) for m in req_args if m]
    assert paths == ["/tmp/jei-edge/requirements/jetson-jp${JETPACK}.txt"], paths
    copied = [args for kw, args in instructions if kw == "COPY" and args.startswith("requirements/")]
    assert copied == ["requirements/ /tmp/jei-edge/requirements/"]
    for jp in JETPACKS:
        assert (ROOT / "requirements" / f"jetson-jp{jp}.txt").is_file()
    assert any(re.fullmatch(r"pip install --no-deps /tmp/jei-edge", c) for c in installs), "jei-edge itself, --no-deps"


def test_never_installs_torch_onnxruntime_or_a_pypi_tensorrt(instructions):
    for cmd in shell_commands(instructions):
        if not re.search(r"\b(pip3?|apt-get|apt|conda|mamba|uv)\b.*\binstall\b", cmd):
            continue
        for token in shlex.split(cmd):
            name = re.split(r"[<>=!~\[;@]", token, 1)[0]
            if token.startswith("-") or "/" in name:
                continue
            assert not FORBIDDEN.match(canonicalize_name(name)) and not name.startswith("python3-torch"), \
                f"{cmd!r} installs {token!r}: not part of the Jetson runtime"


def test_checks_tensorrt_and_runs_jei_edge_as_non_root(instructions):
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "import tensorrt" in runs, "the build imports JetPack's TensorRT"
    assert "find_spec('tensorrt')" in runs, "and checks it is there even when the import is skipped"
    entry = [json.loads(args) for kw, args in instructions if kw == "ENTRYPOINT"]
    cmd = [json.loads(args) for kw, args in instructions if kw == "CMD"]
    assert entry == [["jei-edge"]] and cmd == [["--help"]], (entry, cmd)
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the commands run as a non-root user"


# ---- the pins -------------------------------------------------------------------------------


@pytest.mark.parametrize("jetpack", JETPACKS)
def test_pins_are_exact_and_light(jetpack, toolchains):
    python = python_of(toolchains, jetpack)
    reqs = pins(jetpack, python)
    for name, req in reqs.items():
        pinned_version(req)
        assert not FORBIDDEN.match(name), f"{name}: never in the Jetson runtime (TensorRT is JetPack's)"
    cuda_majors = {c.split(".")[0] for c in toolchains[jetpack]["cuda"]}
    assert len(cuda_majors) == 1
    assert str(pinned_version(reqs["cuda-python"]).major) == cuda_majors.pop(), \
        f"cuda-python's major must be JetPack {jetpack}'s CUDA major"


@pytest.mark.parametrize("jetpack", JETPACKS)
def test_pins_satisfy_setup_py(jetpack, toolchains):
    python = python_of(toolchains, jetpack)
    reqs = pins(jetpack, python)
    install, cuda = setup_requirements()
    for line in install + cuda:
        want = Requirement(line)
        if want.marker is not None and not want.marker.evaluate(board_env(python)):
            continue
        name = canonicalize_name(want.name)
        assert name in reqs, f"setup.py needs {want} on JetPack {jetpack}; not pinned"
        assert want.specifier.contains(pinned_version(reqs[name]), prereleases=True), \
            f"setup.py needs {want}; pinned {reqs[name]}"


def manylinux_platforms(glibc_minor: int) -> List[str]:
    """The manylinux aarch64 tags a board of glibc 2.<glibc_minor> installs (pip matches them exactly)."""
    return ["manylinux2014_aarch64"] + [f"manylinux_2_{n}_aarch64" for n in range(17, glibc_minor + 1)]


# glibc of the JetPacks' Ubuntu: 22.04 (JetPack 6) 2.35, 24.04 (JetPack 7) 2.39
GLIBC = {"6": 35, "7": 39}


@pytest.mark.parametrize("jetpack", JETPACKS)
def test_pins_resolve_to_wheels_for_the_board(jetpack, toolchains, tmp_path):
    """pip downloads a wheel of every pin for aarch64 and the JetPack's Python (needs the index), and
    no wheel requires a package that is not pinned (the image installs with --no-deps)."""
    python = python_of(toolchains, jetpack)
    reqs = pins(jetpack, python)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python, "--dest", str(tmp_path), "--retries", "1", "--timeout", "15",
           "--progress-bar", "off", "--disable-pip-version-check"]
    for platform in manylinux_platforms(GLIBC[jetpack]):
        cmd += ["--platform", platform]
    proc = subprocess.run(cmd + [f"{name}=={pinned_version(r)}" for name, r in reqs.items()],
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if any(s in output for s in UNREACHABLE):
            reason = next(line for line in output.splitlines() if any(s in line for s in UNREACHABLE))
            pytest.skip(f"the package index is not reachable: {reason.strip()[:300]}")
        pytest.fail(f"pip download failed for JetPack {jetpack} (Python {python}, aarch64):\n{output[-4000:]}")

    wheels = {}
    for path in tmp_path.iterdir():
        assert path.suffix == ".whl", f"{path.name}: not a wheel"
        name, version, _, tags = parse_wheel_filename(path.name)
        assert any(t.platform == "any" or t.platform.endswith("aarch64") for t in tags), path.name
        wheels[canonicalize_name(name)] = (version, path)
    assert set(wheels) == set(reqs), f"downloaded {sorted(wheels)}, pinned {sorted(reqs)}"

    missing = []
    for name, (version, path) in sorted(wheels.items()):
        assert version == pinned_version(reqs[name]), f"{path.name}: not the pinned {reqs[name]}"
        with zipfile.ZipFile(path) as whl:
            meta_name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(whl.read(meta_name).decode())
        requires_python = meta.get("Requires-Python")
        if requires_python:
            assert Version(f"{python}.0") in SpecifierSet(requires_python), \
                f"{path.name} requires Python {requires_python}"
        for dep in meta.get_all("Requires-Dist") or []:
            req = Requirement(dep)
            if req.marker is not None and not req.marker.evaluate(board_env(python)):
                continue
            dep_name = canonicalize_name(req.name)
            if dep_name not in reqs or not req.specifier.contains(pinned_version(reqs[dep_name]), prereleases=True):
                missing.append(f"{name} {version} requires {req} (pinned: {reqs.get(dep_name, 'nothing')})")
    assert not missing, "with --no-deps these would be missing or mismatched:\n" + "\n".join(missing)

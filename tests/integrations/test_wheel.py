"""The release, as a user gets it: the sdist and the wheel that `make dist` builds, the wheel
installed in a fresh virtualenv with the core dependencies only, scoring jobs from there.

A module missing from the wheel, a dependency the code imports but the metadata does not
declare, an optional extra imported at the top of a core module, or a version that differs
between pyproject.toml and ``mlpool.__version__`` fails here, as it would for a user.

The build runs on a copy of the work tree (the files git tracks or would track), so that it
neither writes into the tree (``build/``, ``src/mlpool.egg-info``) nor races a ``make dist``
or a second suite running beside this one. The virtualenv is made without pip, and the dev
environment's pip installs into it (``pip --python``): the same install, a few seconds faster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

import mlpool

REPO = Path(__file__).resolve().parents[2]
# Every module of the package, subpackages included: each must reach the sdist and the wheel.
PACKAGE_FILES = sorted(p.relative_to(REPO / "src").as_posix() for p in (REPO / "src" / "mlpool").rglob("*.py"))
# A bound on each build, install or run, far above the seconds each takes: a hung step fails, never hangs.
STEP_TIMEOUT = 240.0


def _run(cmd: list[str | Path], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure, fail with its output (a build or an install says why)."""
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False, **kwargs
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited with {done.returncode}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return done


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built as `make dist` builds them (the wheel from the sdist)."""
    root = tmp_path_factory.mktemp("dist")
    tree = root / "tree"
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not there
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    out = root / "out"
    _run([sys.executable, "-m", "build", "--outdir", out, tree])
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel and what it requires, nothing else."""
    path = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", dist["wheel"]])
    return path


@pytest.mark.timeout(600)
def test_the_sdist_and_the_wheel_hold_what_they_should(dist: dict[str, Path]) -> None:
    version = mlpool.__version__
    assert dist["wheel"].name == f"mlpool-{version}-py3-none-any.whl", "pyproject's version is not mlpool.__version__"

    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = HeaderParser().parsestr(wheel.read(f"mlpool-{version}.dist-info/METADATA").decode())
    stray = [n for n in names if not n.startswith(("mlpool/", f"mlpool-{version}.dist-info/"))]
    assert not stray, f"the wheel holds more than the package: {stray}"
    assert sorted(n for n in names if n.endswith(".py")) == PACKAGE_FILES
    assert "mlpool/py.typed" in names
    assert f"mlpool-{version}.dist-info/licenses/LICENSE" in names
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Description-Content-Type"] == "text/markdown"

    with tarfile.open(dist["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile()}
    sources = [f"src/{name}" for name in PACKAGE_FILES]
    for wanted in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "src/mlpool/py.typed", *sources):
        assert wanted in members, f"the sdist lacks {wanted}"
    assert not [m for m in members if m.startswith("tests/")], "the sdist carries part of the test suite"

    # The metadata PyPI would take: twine's checks, warnings included (README markup, fields).
    _run([sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"]])


# Run by the fresh virtualenv's python, from a directory outside the repository.
INSTALLED_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import hashlib
    import importlib
    import importlib.metadata
    import json
    import os
    import sys

    import mlpool
    from mlpool import MLPool, UnknownJobError


    def load_model():
        return {"offset": 10}


    def add(model, x):
        return model["offset"] + x


    def where(model):
        import mlpool as worker_side

        return worker_side.__file__, sys.executable


    def digest_and_echo(model, payload):
        return hashlib.sha256(payload).hexdigest(), payload


    class Refused(Exception):
        pass


    def refuse(model, why):
        raise Refused(why)


    async def score_from_a_coroutine(pool):
        job_id = await pool.create_job_async(score_model_function=add, model_name="m", kwargs={"x": 5})
        return [await pool.score_async("m", add, 2), await pool.get_result_async(job_id, timeout=60)]


    def main():
        report = {
            "python": sys.executable,
            "mlpool": mlpool.__file__,
            "version": mlpool.__version__,
            "dist_version": importlib.metadata.version("mlpool"),
            "installed": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
            "extras": {},
        }
        for module in ("mlpool.fastapi", "mlpool.prometheus"):
            try:
                importlib.import_module(module)
                report["extras"][module] = "imported"
            except ImportError as exc:
                report["extras"][module] = str(exc)
        payload = os.urandom(16 * 2**20)
        with MLPool({"m": load_model}, nb_workers=1, start_timeout=120) as pool:
            report["score"] = pool.score("m", add, 1)
            report["async"] = asyncio.run(score_from_a_coroutine(pool))
            job_id = pool.create_job(add, "m", args=(3,))
            report["job_id"] = pool.get_result(job_id, timeout=60)
            try:
                pool.get_result(job_id)
                report["fetched_twice"] = "returned"
            except UnknownJobError as exc:
                report["fetched_twice"] = type(exc).__name__
            worker_file, worker_python = pool.score("m", where)
            report["worker_mlpool"], report["worker_python"] = worker_file, worker_python
            worker_digest, back = pool.score("m", digest_and_echo, payload)
            report["payload"] = [hashlib.sha256(payload).hexdigest(), worker_digest, hashlib.sha256(back).hexdigest()]
            try:
                pool.score("m", refuse, "no")
                report["refused"] = "returned"
            except Refused as exc:
                report["refused"] = [str(exc), type(exc.__cause__).__name__]
        try:
            MLPool({"m": load_model}, nb_workers=1, backend="ray")
            report["ray"] = "started"
        except Exception as exc:
            report["ray"] = [type(exc).__name__, str(exc)]
        print(json.dumps(report))


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.timeout(600)
def test_the_wheel_installed_alone_scores_jobs(
    dist: dict[str, Path], venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("user")
    assert REPO not in workdir.parents, "the script must run outside the repository"
    script = workdir / "use_mlpool.py"
    script.write_text(INSTALLED_SCRIPT)
    # Nothing of the dev environment leaks in: no PYTHONPATH, no PYTHONHOME, no user site.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PYTHONNOUSERSITE"] = "1"
    done = _run([venv / "bin" / "python", script], cwd=workdir, env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1])

    site = venv.resolve()
    assert Path(report["python"]).parent == venv / "bin"
    assert site in Path(report["mlpool"]).resolve().parents, f"mlpool came from {report['mlpool']}"
    assert site in Path(report["worker_mlpool"]).resolve().parents, "the worker imported another mlpool"
    assert Path(report["worker_python"]).parent == venv / "bin"
    assert report["version"] == report["dist_version"] == mlpool.__version__

    # The core dependencies and nothing an extra adds (NumPy, FastAPI, prometheus_client...).
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        meta = wheel.read(f"mlpool-{mlpool.__version__}.dist-info/METADATA").decode()
    requires = HeaderParser().parsestr(meta).get_all("Requires-Dist") or []
    name_of = {req: _normalize(re.match(r"[A-Za-z0-9._-]+", req).group()) for req in requires}
    core = {name for req, name in name_of.items() if "extra ==" not in req}
    only_in_extras = {name for req, name in name_of.items() if "extra ==" in req} - core - {"mlpool"}
    installed = {_normalize(name) for name in report["installed"]}
    assert core == {"cloudpickle", "threadpoolctl", "psutil"}, f"the core dependencies changed: {sorted(core)}"
    assert core | {"mlpool"} <= installed
    assert "numpy" in only_in_extras
    assert not installed & only_in_extras, f"an extra's package was installed: {sorted(installed & only_in_extras)}"

    assert report["score"] == 11
    assert report["async"] == [12, 15]
    assert report["job_id"] == 13
    assert report["fetched_twice"] == "UnknownJobError"
    sent, seen_by_worker, received = report["payload"]
    assert sent == seen_by_worker == received, "16 MiB of bytes did not make the round trip intact"
    assert report["refused"] == ["no", "RemoteTraceback"]

    # Without their extras, the integrations say what to install.
    assert report["extras"] == {
        "mlpool.fastapi": 'mlpool.fastapi needs FastAPI or Starlette, which is not installed: '
        'pip install "fastapi>=0.110" (or install mlpool with its "fastapi" extra)',
        "mlpool.prometheus": "mlpool.prometheus needs prometheus_client, which is not installed: "
        'pip install "prometheus-client>=0.20" (or install mlpool with its "metrics" extra)',
    }
    # The Ray backend is refused at construction, before any process starts, naming what to install.
    assert report["ray"] == [
        "ImportError",
        'backend="ray" needs Ray, which is not installed: pip install "ray>=2.40" (or install mlpool with its "ray" '
        'extra)',
    ], report["ray"]

"""bpp-kernels is a distribution of its own: an sdist built from bpp-kernels/ installs ALONE into a
fresh virtual environment holding nothing but torch (no transformers, no bpp), and its ops run
there and match the reference. The C++ compile takes minutes, so the fresh install skips it
(``BPP_NO_EXT=1``) unless ``BPP_TEST_KERNELS_EXT=1``; the extension itself is checked in this
interpreter's (editable) install.

Prints the install's time and size (``pytest -s`` shows them)."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "bpp-kernels"
WITH_EXT = os.environ.get("BPP_TEST_KERNELS_EXT") == "1"

pytestmark = pytest.mark.venv

# run by the fresh venv's python, outside the checkout
SNIPPET = r"""
import json, sys, torch
import bpp_kernels as K
from bpp_kernels import reference
assert not [m for m in sys.modules if m.split(".")[0] in ("transformers", "bpp")], "imported transformers or bpp"
for name in ("transformers", "bpp"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable in the fresh venv")
backend = "cpp" if K.backend_info()["masked_swiglu"]["cpu"] == "cpp" else "reference"
g = torch.Generator().manual_seed(0)
m, d, S = 24, 16, 3
w_gate_up, w_down_t = K.pack_swiglu(torch.randn(m, d, generator=g), torch.randn(m, d, generator=g),
                                     torch.randn(d, m, generator=g))
keep_idx, keep_count = K.mask_to_index(torch.rand(S, m, generator=g) < 0.5)
x = torch.randn(S, 2, 5, d, generator=g, requires_grad=True)
y = K.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, backend=backend)
ref = reference.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count)
err = ((y - ref).norm() / ref.norm()).item()
assert err < 1e-5, err
y.sum().backward()
print(json.dumps({"backend": backend, "rel_err": err, "file": K.__file__, "torch": torch.__version__}))
"""


def _run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """A fresh venv with torch and bpp-kernels installed from an sdist of bpp-kernels/ (no deps)."""
    root = tmp_path_factory.mktemp("kernels-alone")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if not WITH_EXT:
        env["BPP_NO_EXT"] = "1"
    env.setdefault("MAX_JOBS", "1")
    # the sdist, from a copy of the sources without build outputs (the checkout stays untouched)
    src = root / "src"
    shutil.copytree(KERNELS, src, ignore=shutil.ignore_patterns("*.so", "build", "*.egg-info", "__pycache__", "dist"))
    sdist = _run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"],
                 cwd=src, env=env).strip().splitlines()[-1]
    sdist = src / "dist" / sdist
    venv = root / "venv"
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet"]
    # the torch this interpreter runs, pinned (the CPU wheel, never another build); setuptools to build
    _run(pip + [f"torch=={torch.__version__.split('+')[0]}", "setuptools>=70"], env=env, cwd=root)
    t1 = time.perf_counter()
    _run(pip + ["--no-build-isolation", "--no-deps", str(sdist)], env=env, cwd=root)
    t2 = time.perf_counter()
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).strip())
    stats = {"venv_and_torch_s": round(t1 - t0, 1), "kernels_install_s": round(t2 - t1, 1),
             "kernels_size_kib": round(_du(site / "bpp_kernels") / 1024), "torch_size_mib": round(_du(site / "torch") / 2**20),
             "with_extension": WITH_EXT}
    print("\nbpp-kernels installed alone:", json.dumps(stats))
    return {"root": root, "python": py, "env": env, "sdist": sdist, "site": site, "stats": stats}


def test_the_sdist_holds_the_sources_and_the_extension_code(alone):
    with tarfile.open(alone["sdist"]) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    expected = {p.relative_to(KERNELS).as_posix() for pattern in ("bpp_kernels/**/*.py", "csrc/**/*.cpp", "csrc/**/*.h")
                for p in KERNELS.glob(pattern)} | {"setup.py", "pyproject.toml", "README.md"}
    assert sorted(expected - names) == []


def test_installed_alone_runs_an_op_without_transformers(alone):
    out = json.loads(_run([alone["python"], "-c", SNIPPET], env=alone["env"], cwd=alone["root"]).strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(alone["site"]), out["file"]  # the installed copy, not the checkout
    assert out["backend"] == ("cpp" if WITH_EXT else "reference")
    assert out["rel_err"] < 1e-5


def test_installed_alone_holds_only_torch_and_its_own_requirements(alone):
    listed = json.loads(_run([alone["python"], "-m", "pip", "list", "--format", "json"], env=alone["env"]))
    names = {p["name"].lower().replace("_", "-") for p in listed}
    assert "bpp-kernels" in names and not names & {"transformers", "bpp", "accelerate", "numpy"}, sorted(names)
    requires = _run([alone["python"], "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('bpp-kernels')))"],
                    env=alone["env"]).split("\n")
    runtime = sorted(re.match(r"[\w.-]+", r).group() for r in requires if r and "extra ==" not in r)
    assert runtime == ["torch", "triton"], runtime


def test_this_install_has_the_cpp_extension():
    """The editable install that scripts/install.sh makes builds bpp_kernels._C next to the sources."""
    import bpp_kernels
    from bpp_kernels import _C  # noqa: F401
    from bpp_kernels import cpp

    assert cpp.AVAILABLE and bpp_kernels.backend_info()["masked_swiglu"]["cpu"] == "cpp"
    assert Path(_C.__file__).parent == Path(bpp_kernels.__file__).parent

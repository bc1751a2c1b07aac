"""The package's layers: importing one never brings in a higher one (in a fresh interpreter,
so that nothing another test imported can hide it), the models and data readers never load
matplotlib, importing the figures never switches matplotlib's backend, and the public API
resolves."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import vqkit

# Bottom to top; a layer may import the layers before it only.
LAYERS = [
    ["vqkit.errors", "vqkit.config", "vqkit.fsutil", "vqkit.precision", "vqkit.distributed"],
    ["vqkit.data"],
    ["vqkit.nn"],
    ["vqkit.prior"],
    ["vqkit.runs"],
    ["vqkit.training"],
    ["vqkit.codec"],
    ["vqkit.inspect"],
    ["vqkit.cli"],
]
NO_MATPLOTLIB = {"vqkit.data", "vqkit.nn", "vqkit.prior", "vqkit.runs", "vqkit.training"}


def _modules(package: str) -> list[str]:
    """The package and every module in it."""
    module = __import__(package, fromlist=["_"])
    if not hasattr(module, "__path__"):
        return [package]
    return [package] + [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]


def _layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return index
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def _imported_after(modules: list[str]) -> list[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_every_module_belongs_to_a_layer():
    for top in vqkit.__all__:
        assert hasattr(vqkit, top)
    for module in _modules("vqkit"):
        if module not in ("vqkit", "vqkit.__main__"):
            _layer_of(module)


@pytest.mark.parametrize("index", range(len(LAYERS) - 1), ids=[layer[0] for layer in LAYERS[:-1]])
def test_a_layer_imports_no_higher_layer(index):
    modules = [m for top in LAYERS[index] for m in _modules(top)]
    loaded = _imported_after(modules)
    higher = sorted(m for m in loaded if m.startswith("vqkit.") and m != "vqkit.__main__"
                    and _layer_of(m) > index)
    assert higher == [], f"importing {LAYERS[index]} brought in higher layers: {higher}"
    if NO_MATPLOTLIB & set(LAYERS[index]):
        assert not any(m == "matplotlib" or m.startswith("matplotlib.") for m in loaded)


def test_figures_leave_matplotlibs_backend_alone():
    code = ("import matplotlib; before = matplotlib.get_backend(); import vqkit.inspect.report, "
            "vqkit.inspect.figures, vqkit.codec.rd; import matplotlib.pyplot; print(before == matplotlib.get_backend(),"
            " matplotlib.rcParams['backend'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MPLBACKEND": "svg", "PATH": ""})
    assert out.stdout.split() == ["True", "svg"]


def test_the_public_api_is_what_a_script_needs():
    import vqkit.training  # a package named like an exported function would shadow it here
    from vqkit import VQVAE, Codec, VectorQuantizer, VqkitError, load_model, load_prior, preset, sample, train  # noqa: F401
    assert train is vqkit.train and callable(train) and train.__module__ == "vqkit.training.stage1"
    errors = [getattr(vqkit, name) for name in vqkit.__all__ if name.endswith("Error")]
    assert len(errors) >= 9 and all(issubclass(e, VqkitError) for e in errors)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        vqkit.nonsense  # noqa: B018

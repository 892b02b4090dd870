"""The scripts under benchmarks/ (files, not a package), imported by name for their tests."""
import importlib.util
from pathlib import Path


def load(name: str):
    """``benchmarks/<name>.py`` as a module."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

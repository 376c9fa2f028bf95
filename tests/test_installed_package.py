"""`pip install .` (not editable): the wheel carries vlkit, data_tools and the shipped recipes, and they
work from another directory, with no checkout on the path.

The wheel is built from a copy of the checkout and installed with `pip install --target` into a folder
of its own; each check runs `python -S` (no site: the venv's editable-install hook stays off) with
PYTHONPATH = that folder + the venv's site-packages (the dependencies), in a tmp working directory.
Those borrowed dependencies are what a fresh venv would lack if pyproject.toml forgot one, so a last
check reads every import of vlkit and data_tools and finds each in the wheel's declared dependencies.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S
from train_helpers import REPO, finish

# What `pip wheel .` reads: the build config, the readme it embeds, the packages and the recipes.
BUILD_INPUTS = ("pyproject.toml", "README.md", "vlkit", "data_tools", "recipes")


def repo_files(folder: str, pattern: str) -> set[str]:
    return {path.relative_to(REPO / folder).as_posix() for path in (REPO / folder).rglob(pattern)
            if "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The checkout's wheel, built without build isolation (offline: the venv's setuptools)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    # A copy: setuptools writes build/ and *.egg-info into the tree it builds.
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist"), str(source)], check=True, capture_output=True, timeout=HANG_GUARD_S)
    (built,) = (work / "dist").glob("vlkit-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel) -> Path:
    """The wheel installed into a folder of its own (no dependencies: the venv's serve)."""
    site = wheel.parent.parent / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=HANG_GUARD_S)
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -S ARGS` seeing only the installed wheel and the venv's dependencies."""
    return finish(start_installed(site, cwd, *args))


def start_installed(site: Path, cwd: Path, *args: str, threads: int | None = None) -> subprocess.Popen:
    """`run_installed` that returns at once, for runs that overlap; `finish` waits for it."""
    dependencies = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), *dependencies]), TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-S", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_wheel_holds_every_module_and_every_shipped_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("vlkit", "data_tools"):  # pyproject.toml lists the packages: a new one must be added there
        missing = {f"{package}/{path}" for path in repo_files(package, "*.py")} - names
        assert not missing, f"not in the wheel (add the package to pyproject.toml's packages): {sorted(missing)}"
    recipes = {f"vlkit/shipped_recipes/{path}" for path in repo_files("recipes", "*") if (REPO / "recipes" / path).is_file()}
    assert "vlkit/shipped_recipes/tiny/align.yaml" in recipes
    assert recipes <= names, f"recipes not in the wheel: {sorted(recipes - names)}"


CHECK = """
import importlib.resources, json, sys
import data_tools.shapes, data_tools.shapes_scoring, vlkit, vlkit.probe
from vlkit.demo import tiny_recipe
from vlkit.recipe import load_recipe
from vlkit.scoring import resolve_scorer

shipped = importlib.resources.files("vlkit.shipped_recipes")
print(json.dumps({
    "modules": [vlkit.__file__, data_tools.shapes.__file__, data_tools.shapes_scoring.__file__, vlkit.probe.__file__],
    "stages": [load_recipe(shipped / "tiny" / f"{name}.yaml").stage for name in ("clip", "align", "instruct")],
    "demo_recipe": str(tiny_recipe("align.yaml")),
    "scorer": callable(resolve_scorer("data_tools.shapes_scoring:scorer_for", sys.argv[1])),
}))
"""


def test_the_installed_package_works_without_the_checkout(installed, shapes_dir, tmp_path):
    help_text = start_installed(installed, tmp_path, "-m", "vlkit", "--help")  # independent: it runs meanwhile
    result = run_installed(installed, tmp_path, "-c", CHECK, str(Path(shapes_dir) / "instruct_test.json"))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for module in found["modules"]:  # imported from the installed wheel, not from the checkout
        assert Path(module).resolve().is_relative_to(installed.resolve()), module
    assert found["stages"] == ["clip", "align", "instruct"]
    assert Path(found["demo_recipe"]).resolve() == (installed / "vlkit" / "shipped_recipes" / "tiny" / "align.yaml").resolve()
    assert found["scorer"] is True

    help_text = finish(help_text)
    assert help_text.returncode == 0, help_text.stderr
    for command in ("train", "chat", "export", "eval"):
        assert command in help_text.stdout


@pytest.mark.slow
def test_train_export_chat_eval_from_the_installed_package(installed, tiny_vision_dir, tiny_llm_dir, shapes_dir,
                                                           tmp_path):
    def vlkit(*args: str) -> subprocess.CompletedProcess:
        return succeeded(args[0], run_installed(installed, tmp_path, "-m", "vlkit", *args))

    def succeeded(command: str, result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        assert result.returncode == 0, f"vlkit {command}: {result.stderr[-3000:]}"
        return result

    recipe = installed / "vlkit" / "shipped_recipes" / "tiny" / "align.yaml"
    vlkit("train", str(recipe), "output_dir=run", f"model.vision={tiny_vision_dir}", f"model.llm={tiny_llm_dir}",
          f"data.dir={shapes_dir}", "train.max_steps=2", "train.batch_size=4", "data.max_val_samples=4",
          "train.report_to=[]")  # the shipped visual_words reader sizes itself to the test tower's 4 x 4 grid
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["steps"] == 2
    vlkit("export", "run", "exported")
    assert (tmp_path / "exported" / "config.json").is_file()
    test_file = Path(shapes_dir) / "instruct_test.json"
    image = Path(shapes_dir) / json.loads(test_file.read_text())[0]["image"]
    # chat and eval both only read the export: they run at once, one thread each.
    chat = start_installed(installed, tmp_path, "-m", "vlkit", "chat", "exported", "--image", str(image),
                           "--prompt", "What colour is the shape?", "--max-new-tokens", "3", "--json", threads=1)
    evaluation = start_installed(installed, tmp_path, "-m", "vlkit", "eval", "exported", "--data", str(test_file),
                                 "--images", shapes_dir, "--out", "eval", "--max-samples", "2",
                                 "--scorer", "data_tools.shapes_scoring:scorer_for", threads=1)
    chat, evaluation = finish(chat), finish(evaluation)
    succeeded("chat", chat)
    succeeded("eval", evaluation)
    assert json.loads(chat.stdout.strip().splitlines()[-1])["new_tokens"] > 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["questions"] > 0


def guarded_by_import_error(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a `try` that handles ImportError: optional dependencies."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = " ".join(ast.unparse(handler.type) for handler in node.handlers if handler.type is not None)
            if "ImportError" in caught or "ModuleNotFoundError" in caught:
                guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return guarded


def third_party_imports(package: str) -> set[str]:
    """Top-level modules outside the stdlib and the wheel that the package imports unguarded, lazily or not."""
    own = {"vlkit", "data_tools"}
    found = set()
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        optional = guarded_by_import_error(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - own - set(sys.stdlib_module_names)


# Imported unguarded but only on a path that needs it installed; each must be in an extra.
OPTIONAL_IMPORTS = {"deepspeed": "only under a DeepSpeed ZeRO-3 config (vlkit/train/checkpoint.py)"}


def test_every_module_the_package_imports_is_a_declared_dependency(wheel):
    # A fresh venv installs only what the wheel declares; the other checks borrow this venv's packages.
    import importlib.metadata
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    def name(requirement: str) -> str:
        return re.split(r"[\s;\[<>=!~]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    requirements = metadata.get_all("Requires-Dist")
    declared = {name(r) for r in requirements if "extra ==" not in r}
    in_extras = {name(r) for r in requirements if "extra ==" in r}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(third_party_imports("vlkit") | third_party_imports("data_tools")):
        distributions = {name(found) for found in providers.get(module, [module])}
        if not distributions & declared and not (module in OPTIONAL_IMPORTS and distributions & in_extras):
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
    assert {"transformers", "torch", "peft"} <= declared

"""Recipe validation: every recipe error is one line, caught before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import REPO, align_recipe, run_cli, write_recipe

from vlkit.cli import main as cli_main
from vlkit.errors import ConfigError
from vlkit.recipe import load_recipe
from vlkit.train.run import plan_run


def recipe_file(tmp_path, tree, name="recipe.yaml") -> str:
    return write_recipe(tmp_path / name, tree)


@pytest.fixture
def base_tree(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    return align_recipe(tmp_path / "run", tiny_vision_dir, tiny_llm_dir, shapes_dir)


def test_misspelled_key_gets_did_you_mean(tmp_path, base_tree):
    base_tree["train"]["learning_rat"] = 1e-3
    with pytest.raises(ConfigError, match="unknown recipe key 'train.learning_rat'; did you mean 'train.learning_rate'"):
        load_recipe(recipe_file(tmp_path, base_tree))


def test_wrong_type_names_the_key_path(tmp_path, base_tree):
    with pytest.raises(ConfigError, match="recipe key 'train.batch_size'"):
        load_recipe(recipe_file(tmp_path, base_tree), ["train.batch_size=lots"])


def test_a_key_that_takes_either_of_two_kinds_names_the_key_and_both(tmp_path, base_tree):
    """train.bf16 is true/false or 'auto': the error names the key (not pydantic's tag for a union member,
    'train.bf16.bool') and what each kind would have taken."""
    with pytest.raises(ConfigError, match="^recipe key 'train.bf16': Input should be a valid boolean.*; or Input "
                                          "should be 'auto' \\(got 'maybe'\\)$"):
        load_recipe(recipe_file(tmp_path, base_tree), ["train.bf16=maybe"])


def test_unknown_stage(tmp_path, base_tree):
    base_tree["stage"] = "algin"
    with pytest.raises(ConfigError, match="did you mean 'align'"):
        load_recipe(recipe_file(tmp_path, base_tree))


def test_override_syntax(tmp_path, base_tree):
    recipe = load_recipe(recipe_file(tmp_path, base_tree), ["train.max_steps=7", "model.connector={type: linear}"])
    assert recipe.train.max_steps == 7 and recipe.model.connector == {"type": "linear"}
    with pytest.raises(ConfigError, match="is not key=value"):
        load_recipe(recipe_file(tmp_path, base_tree), ["train.max_steps"])


def test_missing_data_file(tmp_path, base_tree):
    base_tree["data"]["train_file"] = "nope.json"
    with pytest.raises(ConfigError, match="data file not found: .*nope.json"):
        plan_run(load_recipe(recipe_file(tmp_path, base_tree)))


def test_align_may_not_train_the_llm(tmp_path, base_tree):
    base_tree["tune"] = {"llm": "lora"}
    with pytest.raises(ConfigError, match="use stage: instruct to train the LLM"):
        plan_run(load_recipe(recipe_file(tmp_path, base_tree)))


def fake_run(folder: Path, vision: str, llm: str, finished: bool = True) -> None:
    folder.mkdir(parents=True)
    manifest = {"format": "vlkit-run/1", "stage": "align", "bases": {"vision": {"source": vision, "sha256": None},
                "llm": {"source": llm, "sha256": None}}, "model": {"connector": {"type": "mlp", "depth": 2}},
                "tune": {}, "stages": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if finished:
        (folder / "run_summary.json").write_text("{}")


def test_init_from_another_architecture(tmp_path, base_tree, tiny_llm_dir):
    fake_run(tmp_path / "other", vision="some/other-tower", llm=tiny_llm_dir)
    base_tree.update(stage="instruct", init_from=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="was trained with vision 'some/other-tower' but this recipe names"):
        plan_run(load_recipe(recipe_file(tmp_path, base_tree)))
    base_tree["init_from"] = str(tmp_path / "not-a-run")
    with pytest.raises(ConfigError, match="init_from: .* is not a vlkit run"):
        plan_run(load_recipe(recipe_file(tmp_path, base_tree)))


def test_finished_output_dir_refused_unless_overwrite(tmp_path, base_tree, tiny_vision_dir, tiny_llm_dir):
    fake_run(Path(base_tree["output_dir"]), tiny_vision_dir, tiny_llm_dir)
    path = recipe_file(tmp_path, base_tree)
    with pytest.raises(ConfigError, match="holds a finished run; set overwrite=true"):
        plan_run(load_recipe(path))
    assert plan_run(load_recipe(path, ["overwrite=true"])).resume_from is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.connector.type=mpl"], "unknown connector type 'mpl'; known types: .* Did you mean 'mlp'"),
    (["model.connector.depth=two"], "connector 'mlp' option depth must be int, got 'two'"),
    (["model.connector.depth=true"], "connector 'mlp' option depth must be int, got True"),
    (["model.connector.type=qformer", "model.connector.depth=true"], "connector 'qformer' option depth must be int .*got True"),
    (["model.connector.width=3"], "connector 'mlp' got unknown option.s. width; it accepts: depth, activation, bias"),
    (["model.vision=/nope/tower"], "model.vision: no folder /nope/tower; give a model folder, a hub id"),
    (["model.llm=./nope"], "model.llm: no folder ./nope; .*or an embedded LLM name"),
    (["model.llm=smollm2-135m"], "model.llm: 'smollm2-135m' is not an embedded LLM; did you mean 'smollm2-135m-instruct'"),
])
def test_connector_and_local_bases_are_checked_before_loading(tmp_path, base_tree, overrides, message):
    """What the dry run can check without weights: the connector's type, option names and option types, and
    that a base named by a path exists (else loading asks the hub for a repo of that name)."""
    with pytest.raises(ConfigError, match=message):
        plan_run(load_recipe(recipe_file(tmp_path, base_tree), overrides))


def test_cli_prints_one_line_and_exits_nonzero(tmp_path, base_tree):
    # A real process, so that everything it prints is seen: the suite's one check that a recipe error
    # is the whole of stderr.
    base_tree["data"]["train_fle"] = "x"
    result = run_cli("train", recipe_file(tmp_path, base_tree), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown recipe key 'data.train_fle'; did you mean 'data.train_file'?"
    ]


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_llava_recipes_pass_dry_run(tmp_path, stage, capsys):
    recipe = REPO / "recipes" / "llava-1.5-7b" / f"{stage}.yaml"
    tree = load_recipe(recipe)
    data_dir = tmp_path / "llava"
    (data_dir / (tree.data.image_root or ".")).mkdir(parents=True)
    (data_dir / tree.data.train_file).write_text("[]")
    overrides = [f"data.dir={data_dir}", f"output_dir={tmp_path / 'out'}"]
    if stage == "instruct":
        fake_run(tmp_path / "align-run", tree.model.vision or "openai/clip-vit-large-patch14-336",
                 tree.model.llm or "lmsys/vicuna-7b-v1.5", finished=True)
        overrides.append(f"init_from={tmp_path / 'align-run'}")
    # In-process: a fresh interpreter would only add its torch start-up.
    returncode = cli_main(["train", str(recipe), *overrides, "--dry-run"])
    printed = capsys.readouterr()
    assert returncode == 0, printed.err
    assert "recipe is valid; nothing loaded" in printed.out
    assert f"stage     {stage}" in printed.out


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "tiny").glob("*.yaml")), ids=lambda p: p.name)
def test_tiny_recipes_validate(recipe):
    assert load_recipe(recipe).stage in ("clip", "align", "instruct")

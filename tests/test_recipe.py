"""YAML recipes map one to one onto the config dataclasses, and round-trip exactly."""

import subprocess
import sys

import pytest
import yaml

from peftkit.errors import ConfigError
from peftkit.plan import resolve
from peftkit.recipe import load_recipe, recipe_from_dict, recipe_to_dict, save_recipe


def test_shipped_recipes_load(request):
    from peftkit.registry import get_method

    root = request.config.rootpath / "recipes"
    recipes = [path for path in sorted(root.glob("*.yaml")) if not path.name.startswith("compare-")]
    assert len(recipes) >= 5  # compare plans are checked in test_compare.py
    for path in recipes:
        recipe = load_recipe(path)
        # The method config equals the one built by hand from the file's own method section.
        section = dict(yaml.safe_load(path.read_text())["method"])
        by_hand = get_method(section.pop("name")).config_cls(**section)
        assert resolve(recipe).method_config == by_hand, path.name


def test_recipe_round_trip_is_exact(tmp_path, request):
    recipe = load_recipe(request.config.rootpath / "recipes" / "minilm-lora.yaml")
    save_recipe(recipe, tmp_path / "again.yaml")
    again = load_recipe(tmp_path / "again.yaml")
    assert again == recipe
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    # Every method option written is a field of the method's config class.
    assert resolve(recipe).method_config.rank == 8
    assert recipe.training.learning_rate == pytest.approx(1e-3)


def test_overrides_change_exactly_the_named_keys(tmp_path, request):
    path = request.config.rootpath / "recipes" / "minilm-lora.yaml"
    base = load_recipe(path)
    changed = load_recipe(
        path, ["training.max_steps=7", "method.rank=4", "method.name=dora", "model=tiny-bert"]
    )
    assert changed.training.max_steps == 7 and changed.model == "tiny-bert"
    assert (
        resolve(changed).method_config.rank == 4
        and type(resolve(changed).method_config).__name__ == "DoraConfig"
    )
    assert changed.task == base.task


def test_yaml_reads_scientific_notation_as_number(tmp_path):
    # PyYAML reads "5e-4" as a string; the recipe must still get a float.
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "task": {"dataset": "amazon-reviews"},
                "method": {"name": "lora"},
                "training": {"learning_rate": "5e-4"},
            }
        )
    )
    assert load_recipe(path).training.learning_rate == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"trainig": {}}, r"Unknown key 'trainig' in the recipe\. Did you mean 'training'\?"),
        ({"training": {"max_stpes": 3}}, r"'max_stpes' in training\. Did you mean 'max_steps'"),
        ({"method": {"name": "lora", "rnak": 4}}, r"'rnak' in method 'lora'\. Did you mean 'rank'"),
        ({"method": {"name": "lroa"}}, r"Unknown method 'lroa'\. Did you mean 'lora'"),
        ({"task": {"type": "regression", "dataset": "x"}}, r"Unknown task type 'regression'"),
        ({"training": {"max_steps": "many"}}, r"'max_steps' in training must be a number"),
        ({"method": {"name": "lora", "rank": 0}}, r"rank must be at least 1"),
    ],
)
def test_bad_recipe_keys_name_the_problem(data, message):
    """Reading refuses the sections' keys; resolving the plan refuses the method section."""
    with pytest.raises(ConfigError, match=message):
        resolve(recipe_from_dict(data))


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from peftkit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False False", result.stderr


def test_bf16_precision_reaches_the_trainer(tmp_path, request):
    from peftkit.training.run import training_arguments

    recipe = load_recipe(
        request.config.rootpath / "recipes" / "minilm-lora.yaml", ["training.precision=bf16"]
    )
    assert training_arguments(recipe, tmp_path).bf16 is True
    default = load_recipe(request.config.rootpath / "recipes" / "minilm-lora.yaml")
    assert training_arguments(default, tmp_path).bf16 is False


def test_a_recipe_without_a_method_trains_the_registry_default():
    """recipe.py names the default without importing the registry; the two agree."""
    from peftkit.recipe import Recipe
    from peftkit.registry import DEFAULT_METHOD

    assert Recipe().method == {}
    assert resolve(Recipe()).method.name == DEFAULT_METHOD
    assert recipe_from_dict(recipe_to_dict(Recipe())) == Recipe()


def test_reading_a_recipe_imports_neither_torch_nor_a_method(request):
    """The cheap checks run before torch: reading, overriding and checking a recipe's folder and
    data files import neither torch nor any peftkit method (run in a fresh interpreter)."""
    path = request.config.rootpath / "recipes" / "minilm-lora.yaml"
    code = (
        "import sys\n"
        "from peftkit.recipe import check_data_files, load_recipe\n"
        f"check_data_files(load_recipe({str(path)!r}, ['method.rank=4']))\n"
        "heavy = [m for m in sys.modules if m in ('torch', 'transformers', 'peft')"
        " or m.startswith('peftkit.methods')]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("case", ["earlier run", "missing data file", "unknown key"])
def test_cheap_refusals_of_train_import_no_torch(tmp_path, case):
    """`peftkit train` refuses an earlier run's folder, a missing data file and an unknown
    recipe key before torch is imported, leaving the folder as it was."""
    recipe = tmp_path / "r.yaml"
    data = "train_file: nothere.csv" if case == "missing data file" else "dataset: copy-words"
    extra = "\ntrainig: {}" if case == "unknown key" else ""
    recipe.write_text(
        f"model: tiny-bert\ntask: {{{data}}}\noutput_dir: {tmp_path / 'run'}{extra}\n"
    )
    if case == "earlier run":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "summary.json").write_text("{}")
    code = (
        "import sys\n"
        "from peftkit.cli import main\n"
        f"status = main(['train', {str(recipe)!r}])\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["2", "False"], out.stderr
    expected = {"earlier run": "already holds a finished run", "unknown key": "Unknown key",
                "missing data file": "nothere.csv does not exist"}[case]  # fmt: skip
    assert expected in out.stderr
    if case == "earlier run":
        assert (tmp_path / "run" / "summary.json").read_text() == "{}"


def test_methods_verbose_says_what_each_record_can_do(capsys):
    """`peftkit methods -v` lists each method's options and capabilities from its record: the
    switch-off line appears exactly for the records that have one."""
    from peftkit.cli import main
    from peftkit.registry import METHODS

    assert main(["methods", "-v"]) == 0
    text = capsys.readouterr().out
    for method in METHODS:
        start = text.index(f"{method.name}: {method.description}")
        can = text[start:].split("    can: ", 1)[1].splitlines()[0]
        assert ("switch off" in can) == (method.switch_off is not None), method.name
        assert ("combine adapters" in can) == (method.composition is not None), method.name
        for option in method.options:
            assert f"    option {option.name}: " in text[start:], (method.name, option.name)

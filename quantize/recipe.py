"""The recipe: one YAML file describing a whole release. Schema, loading and friendly errors.

The shared sections are in schema.py; each format plugin (quantize/formats/) owns its section,
which is added here as an optional key named after the format. Pure: reading the YAML file is
the only I/O here. Paths in a recipe are relative to the recipe.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from .errors import BadInput, read_user_text
from .formats import all_formats
from .schema import HUB_ID, Calibration, CardOptions, Compute, Publish, QualityOptions, Release, Source, Strict

__all__ = ["Recipe", "HUB_ID", "StrictLoader", "load_recipe", "parse_recipe", "with_compute", "with_device", "with_model_path", "yaml_problem"]


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (else the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def yaml_problem(exc: yaml.YAMLError, first_line: int = 1) -> str:
    """A YAML error as one line: where (lines counted from `first_line`), and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + first_line}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or "invalid YAML"
    return f"malformed YAML{where}: {problem}"


class RecipeBase(Strict):
    source: Source
    release: Release
    calibration: Calibration = Field(default_factory=Calibration)
    publish: Publish = Field(default_factory=Publish)
    card: CardOptions = Field(default_factory=CardOptions)
    compute: Compute = Field(default_factory=Compute)
    quality: QualityOptions = Field(default_factory=QualityOptions)
    base_dir: Path = Field(Path("."), exclude=True)  # the recipe's folder; relative paths start here

    @model_validator(mode="after")
    def _format_sections(self) -> "RecipeBase":
        for plugin in all_formats():
            plugin.check_section(getattr(self, plugin.name))
            problem = self.release.repo_problem(plugin.title) if getattr(self, plugin.name) is not None else None
            if problem:
                raise ValueError(f"release.basename: {problem}")
        if not self.formats():
            names = [f.name for f in all_formats()]
            raise ValueError(f"the recipe lists no variants: add {', '.join(names[:-1])} or {names[-1]}")
        return self

    def formats(self) -> list[str]:
        """The formats whose section the recipe has, in plugin order."""
        return [plugin.name for plugin in all_formats() if getattr(self, plugin.name) is not None]

    def resolve(self, path: Path | None) -> Path | None:
        """A recipe path made absolute against the recipe's folder."""
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def resolved_calibration(self) -> Calibration:
        """The calibration section with its file path made absolute."""
        return self.calibration.model_copy(update={"path": self.resolve(self.calibration.path)})


# One optional key per format plugin, holding that plugin's section.
Recipe = create_model("Recipe", __base__=RecipeBase,
                      **{plugin.name: (plugin.section, None) for plugin in all_formats()})


def _format_error(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    where = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", where)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    return f"{where}: {message}" if where else message


def parse_recipe(data: Any, base_dir: Path, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise BadInput(f"{origin}: expected a mapping of keys at the top level")
    try:
        return Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise BadInput(f"{origin}: {_format_error(errors[0])}{more}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; any problem is a BadInput naming the field."""
    path = Path(path)
    text = read_user_text(path, "recipe", kind="recipe file")
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: {yaml_problem(exc)}") from None
    return parse_recipe(data, path.parent.resolve(), str(path))


def with_model_path(recipe: Recipe, model_path: str | Path) -> Recipe:
    """The recipe with its source replaced by a local folder (`--model`, e.g. right after training)."""
    folder = Path(model_path).expanduser()
    if not folder.exists():
        raise BadInput(f"--model: {folder} does not exist")
    if not folder.is_dir():
        raise BadInput(f"--model: {folder} is a file, not a model folder (give the folder holding config.json)")
    source = recipe.source.model_copy(update={"path": folder.resolve(), "hub": None,
                                              "repo_id": recipe.source.base_model})
    return recipe.model_copy(update={"source": source})


def with_device(recipe: Recipe, device: str) -> Recipe:
    """The recipe with `compute.device` replaced (`--device`)."""
    return with_compute(recipe, device=device)


def with_compute(recipe: Recipe, **options: str | None) -> Recipe:
    """The recipe with `compute` settings replaced by the command line's (`--device`, `--offload`)."""
    given = {name: value for name, value in options.items() if value is not None}
    if not given:
        return recipe
    try:
        compute = Compute(**{**recipe.compute.model_dump(), **given})
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = f"--{error['loc'][0]}" if error.get("loc") else "compute"
        raise BadInput(f"{flag}: {error['msg'].removeprefix('Value error, ')}") from None
    return recipe.model_copy(update={"compute": compute})

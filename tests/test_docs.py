"""The documentation site's generated pages (tools/docs/hooks.py): the config reference lists every key a
config file takes, with the comment beside it in the source, and the benchmarks page shows its images from
inside the site. (The site itself is built strictly and checked in a browser by .ci/run; the docs' checked
code blocks run in tests/test_interop.py.)"""

import dataclasses
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from ddpm.config import Config, DataConfig, SampleConfig, TrainConfig
from ddpm.edm import FORMULATIONS
from ddpm.models import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs" / "hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """The config reference page, split into its sections by their `## ` / `### ` headings."""
    parts = re.split(r"^(#{2,3} .*)$", hooks.config_reference(), flags=re.M)
    return {heading: body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def rows(text: str) -> dict[str, list[str]]:
    """Table rows by their key: [type, default, meaning]."""
    found = {}
    for line in text.splitlines():
        # a | splits cells outside code spans, unless escaped (as Python-Markdown's tables read them)
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`"):
            found[cells[0].strip("`")] = cells[1:]
    return found


def test_field_comments_reads_end_of_line_comments_lines_above_and_continued_lines():
    source = """
    first: int = 1  # the first
    # about the second,
    # on two lines
    second: str = "a"
    third: int | None = (
        None  # the third, on its continuation line
    )
    fourth: bool = False
"""
    assert hooks.field_comments(source) == {
        "first": "the first",
        "second": "about the second, on two lines",
        "third": "the third, on its continuation line",
        "fourth": "",
    }


@pytest.mark.parametrize("section", [DataConfig, TrainConfig, SampleConfig])
def test_the_config_reference_has_every_field_of_each_section_with_its_default(reference, section):
    name = next(f.name for f in dataclasses.fields(Config) if f.type in (section, section.__name__))
    table = rows(reference[f"## `{name}`"])
    assert list(table) == [f.name for f in dataclasses.fields(section)]
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert table[f.name][1] == f"`{hooks._value(default)}`"
    # the comment above a field (label_dropout's) and the one beside it (steps's) are its meaning
    if section is TrainConfig:
        assert table["label_dropout"][2].startswith("p of dropping a row's conditions")
        assert table["steps"][2] == "optimizer steps"
        assert (
            table["lr_schedule"][2] == "after the warm-up: constant \\| cosine \\| linear (ddpm.lr_schedule)"
        )


@pytest.mark.parametrize(
    "section, key, choices",
    [("model", "architecture", ARCHITECTURES), ("diffusion", "formulation", FORMULATIONS)],
)
def test_the_config_reference_has_every_constructor_argument(reference, section, key, choices):
    assert f"## `{section}`" in reference
    for choice, cls in choices.items():
        table = rows(reference[f"### `{key}: {choice}`: `{cls.__name__}`"])
        parameters = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        assert list(table) == parameters
    unet = rows(reference["### `architecture: unet`: `UNet`"])
    assert unet["base_channels"] == [
        "`int`",
        "`128`",
        "channels of the first level; the time embedding has 4x as many",
    ]
    schedule = rows(reference["### `formulation: ddpm`: `NoiseScheduler`"])
    assert schedule["beta_schedule"][2] == "one of BETA_SCHEDULES (linear, scaled_linear, cosine, sigmoid)"


def test_the_benchmarks_page_shows_its_images_from_inside_the_site():
    page = hooks.benchmarks_page()
    assert "<img" not in page and "](docs/" not in page and "](bench/results/" not in page
    assert "![W1 against network calls, log-log, linear and cosine schedules](bench/samplers.png)" in page
    assert '](digits.png){ width="138" style="image-rendering: pixelated" }' in page
    for source in hooks.BENCHMARK_IMAGES:
        assert (ROOT / source).is_file()


def test_every_module_of_the_package_has_an_api_page():
    """Each module of ddpm (but the `python -m` entry points) is rendered by a `::: module` line of a page
    in docs/api/, so that a new module cannot be left out of the API reference."""
    modules = set()
    for path in (ROOT / "ddpm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] != "__main__":
            modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    pages = "\n".join(page.read_text() for page in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: (\S+)$", pages, flags=re.M))
    assert modules - documented == set(), "add these modules to a page of docs/api/"
    assert documented - modules == set(), "these API pages name modules that do not exist"

"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that are generated from the source at every build, so that
they cannot drift from it.

- `reference/config.md`: every key of a config file, its type, default and meaning, read from the config
  dataclasses of `ddpm.config` (their fields and the comments beside them) and from the constructors the
  `model` and `diffusion` sections pass their keys to (`ddpm.models.ARCHITECTURES`, `ddpm.edm.FORMULATIONS`).
- `benchmarks.md`: BENCHMARKS.md from the repository root, with its image paths made relative to the site
  (and the plot it shows from bench/results/ copied in).
"""

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PAGE = "reference/config.md"
BENCHMARKS_PAGE = "benchmarks.md"
# Files of the repository that BENCHMARKS.md shows, by their path there -> their path in the site.
BENCHMARK_IMAGES = {"bench/results/samplers.png": "bench/samplers.png"}


def on_files(files: "Files", config: Any) -> "Files":
    """Adds the generated pages (and the images BENCHMARKS.md shows) to the site's files."""
    # Imported here so that the page generators below import without MkDocs (tests/test_docs.py runs them).
    from mkdocs.structure.files import File

    files.append(File.generated(config, CONFIG_PAGE, content=config_reference()))
    files.append(File.generated(config, BENCHMARKS_PAGE, content=benchmarks_page()))
    for source, target in BENCHMARK_IMAGES.items():
        files.append(File.generated(config, target, abs_src_path=str(ROOT / source)))
    return files


def config_reference() -> str:
    """The config reference page: one table per section, each key with its type, default and comment."""
    from ddpm.config import BUNDLED_CONFIGS, TOP_LEVEL_KEYS, Config
    from ddpm.edm import FORMULATION, FORMULATIONS
    from ddpm.models import ARCHITECTURES

    top = {f.name: f for f in dataclasses.fields(Config)}
    bundled = ", ".join(f"`{path.stem}`" for path in sorted(BUNDLED_CONFIGS.glob("*.yaml")))
    lines = [
        "# Config reference",
        "",
        "Generated from the source at every build of this site (`tools/docs/hooks.py` reads the dataclasses "
        "of `ddpm/config.py` and the constructors the `model` and `diffusion` sections are passed to), so "
        "it lists exactly the keys a config file takes. How a config is read, overridden and checked: "
        "[Configs](../configs.md).",
        "",
        f"A config file has the top-level keys {', '.join(f'`{key}`' for key in TOP_LEVEL_KEYS)}. "
        f"`--config NAME` finds the bundled configs {bundled} (the files of `configs/`). A key left out "
        f"takes the default below; `output_dir` defaults to `{top['output_dir'].default}`.",
        "",
    ]
    for name in ("data", "train", "sample"):
        section = typing.get_type_hints(Config)[name]
        lines += [f"## `{name}`", "", _first_line(section.__doc__ or ""), ""]
        lines += _table(_dataclass_rows(section))
    for name, key, choices, default in (
        ("model", "architecture", ARCHITECTURES, "unet"),
        ("diffusion", FORMULATION, FORMULATIONS, "ddpm"),
    ):
        lines += [
            f"## `{name}`",
            "",
            f"The keyword arguments of one constructor, passed as written (a key left out takes the "
            f"constructor's default). `{name}.{key}` picks the constructor: "
            + ", ".join(f"`{choice}` ({_api_link(cls)})" for choice, cls in choices.items())
            + f"; `{default}` when left out.",
            "",
        ]
        for choice, cls in choices.items():
            lines += [f"### `{key}: {choice}`: `{cls.__name__}`", ""]
            lines += _table(_constructor_rows(cls))
    return "\n".join(lines) + "\n"


def benchmarks_page() -> str:
    """BENCHMARKS.md with the paths of its images made relative to the site's root, and its HTML images
    written as Markdown ones, whose paths MkDocs checks and rewrites for each page's URL."""
    text = re.sub(r"<img [^>]*>", _markdown_image, (ROOT / "BENCHMARKS.md").read_text())
    for source, target in {**BENCHMARK_IMAGES, "docs/": ""}.items():
        text = text.replace(f"]({source}", f"]({target}")
    return text


def _markdown_image(tag: re.Match) -> str:
    """An HTML `<img>` as `![alt](src){ attributes }` (attr_list)."""
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', tag.group(0)))
    source, alt = attributes.pop("src"), attributes.pop("alt", "")
    rest = " ".join(f'{name}="{value}"' for name, value in attributes.items())
    return f"![{alt}]({source})" + (f"{{ {rest} }}" if rest else "")


def field_comments(source: str) -> dict[str, str]:
    """The comment of each `name: type = default` line of a class body or a signature: the comment at the end
    of its line (or of a line continuing it), after the comment lines just above it."""
    comments: dict[str, list[str]] = {}
    above: list[str] = []
    name = None
    for line in source.splitlines():
        if line.strip().startswith("#"):  # a comment line: it belongs to the next field
            above.append(line.strip().lstrip("#").strip())
            continue
        code, _, comment = line.partition("  #")
        declared = re.match(r"\s*(\w+)\s*:", code)
        if declared:
            name = declared.group(1)
            comments[name] = above
        above = []
        if comment.strip() and name is not None:
            comments[name] = [*comments[name], comment.strip()]
    return {key: " ".join(parts) for key, parts in comments.items()}


def _dataclass_rows(cls: type) -> list[tuple[str, str, str, str]]:
    body = inspect.getsource(cls).split("\n    def ", 1)[0]
    comments = field_comments(body)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        comment = _with_choices(comments.get(f.name, ""), cls)
        rows.append((f.name, _type_name(hints[f.name]), _value(default), comment))
    return rows


def _constructor_rows(cls: type) -> list[tuple[str, str, str, str]]:
    source = inspect.getsource(cls.__init__)
    signature_end = re.search(r"^\s*\)( -> [^:]+)?:\s*$", source, flags=re.M)
    comments = field_comments(source[: signature_end.start()] if signature_end else source)
    rows = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = parameter.annotation
        type_name = "" if annotation is inspect.Parameter.empty else _type_name(annotation)
        comment = _with_choices(comments.get(name, ""), cls)
        rows.append((name, type_name, _value(parameter.default), comment))
    return rows


def _with_choices(comment: str, cls: type) -> str:
    """`one of NAME` in a comment, NAME a tuple or dict of the class's module, followed by its values."""
    module = sys.modules[cls.__module__]

    def values(match: re.Match) -> str:
        choices = getattr(module, match.group(1), None)
        if not isinstance(choices, (tuple, list, dict)):
            return match.group(0)
        return f"{match.group(0)} ({', '.join(map(str, choices))})"

    return re.sub(r"\bone of ([A-Z][A-Z_]+)\b", values, comment)


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, type_name, default, comment in rows:
        lines.append(f"| `{name}` | {_code(type_name)} | {_code(default)} | {_escape(comment)} |")
    return [*lines, ""]


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return re.sub(r"\b(typing|collections\.abc)\.", "", text)


def _value(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _escape(text: str) -> str:
    """A comment as the text of a table cell: pipes escaped, so that `a | b` stays in one cell."""
    return text.replace("|", "\\|")


def _first_line(docstring: str) -> str:
    return " ".join(docstring.strip().split("\n\n", 1)[0].split())


def _api_link(cls: type) -> str:
    return f"[`{cls.__name__}`][{cls.__module__}.{cls.__name__}]"

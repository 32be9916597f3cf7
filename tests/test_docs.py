"""The repository carries its own maths page, docs/p3o.md, and nothing in it points outside the checkout.

Docstrings, tests and the README cite the page as "docs/p3o.md section N"; every cited section must be a
numbered heading of the page, and every function its table names must exist in `src/`.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "p3o.md"
SCANNED = ["src", "tests", "README.md", "docs", "examples", "benchmarks", "configs"]
# Written in pieces so that this file does not match its own patterns.
OUTSIDE = ["../" + "shared", "shared" + "/P3O" + ".md"]
OLD_NAME = re.compile("P3O" + r"\.md")  # the outside page's name: a citation that lost its docs/ path
CITATION = re.compile(r"docs/p3o\.md,?\s+sections?\s+(\d+(?:\.\d+)*)(?:\s*(-|–|and|,)\s*(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
TABLE_NAME = re.compile(r"`(p3o(?:\.\w+)+)`")


def text_files() -> list[Path]:
    """Every text file under the scanned paths (binary files such as plots are skipped)."""
    found = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in candidates:
            if any(part == "__pycache__" or part.endswith(".egg-info") or part.startswith(".")
                   for part in file.relative_to(ROOT).parts):
                continue  # build and cache outputs (a stale egg-info copies an old README)
            data = file.read_bytes()
            if b"\0" in data:
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            found.append(file)
    return found


def read(file: Path) -> str:
    return file.read_text(encoding="utf-8")


def doc_sections() -> set[str]:
    return set(HEADING.findall(read(DOC)))


def cited_sections(text: str) -> list[str]:
    """Section numbers cited as "docs/p3o.md section N", "sections N-M", "sections N and M"."""
    cited = []
    for first, joiner, last in CITATION.findall(text):
        cited.append(first)
        if last:
            if joiner in "-–" and first.isdigit() and last.isdigit():
                cited += [str(n) for n in range(int(first) + 1, int(last) + 1)]
            else:
                cited.append(last)
    return cited


def test_the_maths_page_exists_with_numbered_sections():
    assert DOC.is_file()
    top = [n for n in HEADING.findall(read(DOC)) if "." not in n]
    assert top == [str(n) for n in range(1, len(top) + 1)], f"top-level sections must be 1..N in order: {top}"
    assert len(top) >= 6  # sections 1-6 are cited throughout the code


def test_nothing_points_outside_the_repository():
    offenders = [f"{file.relative_to(ROOT)}:{i}: {line.strip()}"
                 for file in text_files() for i, line in enumerate(read(file).splitlines(), 1)
                 if any(pattern in line for pattern in OUTSIDE) or OLD_NAME.search(line)]
    assert not offenders, "cite docs/p3o.md, not a page outside the repository:\n" + "\n".join(offenders)


def test_every_citation_names_a_section_of_the_maths_page():
    sections = doc_sections()
    citations = 0
    missing = []
    for file in text_files():
        for number in cited_sections(read(file)):
            citations += 1
            if number not in sections:
                missing.append(f"{file.relative_to(ROOT)}: section {number}")
    assert citations > 0, "no docs/p3o.md citation found: has the citation format changed?"
    assert not missing, (f"cited sections that docs/p3o.md does not have (it has {sorted(sections)}):\n"
                         + "\n".join(missing))


def test_src_cites_the_maths_page():
    src = [n for file in text_files() if file.is_relative_to(ROOT / "src") for n in cited_sections(read(file))]
    assert {"2", "4", "5", "6"} <= set(src)


@pytest.mark.parametrize("text, expected", [
    ("(docs/p3o.md section 4)", ["4"]),
    ("docs/p3o.md sections 2-4", ["2", "3", "4"]),
    ("docs/p3o.md\n    section 4.5:", ["4.5"]),
    ("docs/p3o.md sections 3 and 6", ["3", "6"]),
    ("docs/p3o.md: notation", []),
])
def test_citation_parser(text, expected):
    assert cited_sections(text) == expected


def defined_names(tree: ast.AST) -> dict[str, ast.AST]:
    names = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def resolves(dotted: str) -> bool:
    """`p3o.pkg.module.name[.attr]` names a module under src/ and a definition in it (read, not imported)."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        base = ROOT / "src" / Path(*parts[:split])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            node: ast.AST = ast.parse(read(module))
            for attr in parts[split:]:
                node = defined_names(node).get(attr)
                if node is None:
                    return False
            return True
    return False


def test_every_function_in_the_equation_table_exists():
    names = sorted(set(TABLE_NAME.findall(read(DOC))))
    assert len(names) >= 20
    missing = [name for name in names if not resolves(name)]
    assert not missing, f"docs/p3o.md names functions that src/ does not define: {missing}"


# --- The documentation site (mkdocs.yml, docs/) and the README that points into it ----------------

README_LIMIT = 12_000


def test_the_readme_stays_short():
    size = len(read(ROOT / "README.md"))
    assert size <= README_LIMIT, (f"README.md has {size} characters, more than {README_LIMIT}: move the detail "
                                  "into a page under docs/ and link to it")


def test_the_command_reference_is_generated_from_the_parser():
    """docs/reference.md is exactly what docs/gen_reference.py renders from `p3o.cli.build_parser()`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen.render()
    committed = read(gen.OUTPUT) if gen.OUTPUT.is_file() else ""
    assert committed == expected, (f"docs/reference.md is out of date with the command-line options; "
                                   f"regenerate it with `{gen.COMMAND}` and commit it")
    for command in ("train", "sft", "rm", "eval", "winrate", "frontier", "pipeline", "demo"):
        assert f"## `p3o {command}`" in expected
    assert "`--clip_eps CLIP_EPS` | `0.2` |" in expected  # a flag, its default from the dataclass, its help


def test_the_site_builds_strictly_and_offline(tmp_path):
    """`mkdocs build --strict`: every page in the nav, every link and anchor resolved, no warnings."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, ("mkdocs build --strict failed (the docs need the test extra: "
                                    "pip install -c constraints.txt -e '.[test]'):\n" + result.stdout + result.stderr)
    assert time.monotonic() - start < 60
    site = tmp_path / "site"
    for page in ("getting-started", "training", "python-api", "baselines", "evaluation", "distributed",
                 "performance", "results", "architecture", "tests", "reference", "p3o"):
        assert (site / page / "index.html").is_file(), f"the site has no page {page}"
    maths = (site / "p3o" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in maths  # the maths page's $...$ are handed to MathJax
    assert (site / "frontier-summarize.png").is_file() and (site / "frontier-dialogue.png").is_file()


def test_no_lower_layer_imports_the_command_line():
    """The configs, the engine and the stages never import `p3o.cli`: the command line sits on top."""
    import re
    from pathlib import Path

    src = Path(__file__).parent.parent / "src" / "p3o"
    offenders = [str(path.relative_to(src)) for path in src.rglob("*.py")
                 if path.parent.name != "cli" and path.name != "__main__.py"
                 and re.search(r"^\s*(from p3o\.cli|import p3o\.cli)", path.read_text(), re.M)]
    assert not offenders, offenders


def test_the_training_core_imports_no_stage():
    """`p3o.core` (optimiser, step, skip guard, checkpoints, the supervised loop) sits below the stages
    that use it: it never imports `rl`, `sft`, `reward`, `eval`, `pipeline`, `tasks` or `cli`."""
    import re
    from pathlib import Path

    core = Path(__file__).parent.parent / "src" / "p3o" / "core"
    above = r"(rl|sft|reward|eval|pipeline|tasks|cli)"
    offenders = [path.name for path in core.rglob("*.py")
                 if re.search(rf"^\s*(from p3o\.{above}\b|import p3o\.{above}\b)", path.read_text(), re.M)]
    assert core.is_dir() and not offenders, offenders

"""The documentation holds together in a clone: links resolve, spec references name sections that exist, no
path of the development machine is cited, and the README's set-up commands are the ones CI runs.

Spec references (the rule the code, tests and docs follow): a reference is `§N` (section `## N.` of a spec
file), `§N.M` (item `M.` of a numbered list in section N), or a range of either: `§A-B` / `§A-§B` (sections A to
B), `§N.M-K` (items M to K of section N). The spec file a reference cites is the last spec file named before it
on the same line (`docs/spec/LMTTM.md`, `docs/spec/MEDMAMBA.md` or `docs/spec/MAM.md`); a reference with no
spec file before it on its line cites the one spec file its file names, and is an error in a file that names
none or several (name the file on that line). A spec file names itself.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC_DIR = REPO / "docs" / "spec"
SPEC_NAMES = ("LMTTM", "MEDMAMBA", "MAM")
TEXT_SUFFIXES = {".py", ".md", ".json", ".txt", ".ini", ".cfg", ".toml", ".yaml", ".yml", ".sh"}
SKIP_DIRS = {".git", ".venv", "venv", "runs", "sweeps", "results", ".whl", ".gl", "__pycache__", ".pytest_cache"}
# written in pieces so that this file does not contain them itself
DEV_PATHS = ("/wo" + "rk/", "../sha" + "red", "shared/" + "design")
DEV_PATHS_TESTS = ("/wo" + "rk/", "shared/" + "design")  # tests may say that they do not use ../shared

SPEC_NAME = re.compile(r"\b(" + "|".join(SPEC_NAMES) + r")\.md\b")
SPEC_REF = re.compile(r"§(\d+)(?:\.(\d+))?(?:[-–](§)?(\d+)(?:\.(\d+))?)?")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def tracked_files() -> list[Path]:
    """The files git tracks (the walk of the tree, less build and run outputs, where git is not there)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        files = [REPO / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*") if not SKIP_DIRS & set(p.relative_to(REPO).parts)]
    return sorted(p for p in files if p.is_file())


def text_files() -> list[Path]:
    return [p for p in tracked_files() if p.suffix in TEXT_SUFFIXES or p.relative_to(REPO).as_posix() == ".ci/run"]


def markdown_files() -> list[Path]:
    return [p for p in tracked_files() if p.suffix == ".md"]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.as_posix()


# ---------------------------------------------------------------------------------------------------------------
# Markdown: headings, anchors, links


def strip_code(text: str) -> str:
    """Text without fenced code blocks and inline code spans (links inside code are not links); lines kept."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def headings(text: str) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.append(m.group(1))
    return out


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, markup and punctuation dropped, spaces to '-', repeats numbered."""
    counts: dict[str, int] = {}
    out = set()
    for title in headings(text):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        counts[slug] = n + 1
    return out


def relative_links(text: str) -> list[str]:
    """Link targets that are not URLs: `[text](target)`, `![alt](target)` and `[ref]: target` definitions."""
    plain = strip_code(text)
    targets = LINK.findall(plain) + LINK_DEF.findall(plain)
    return [t for t in targets if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:|//", t)]


def broken_links(md: Path) -> list[str]:
    bad = []
    for target in relative_links(md.read_text()):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{rel(md)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest.read_text()):
            bad.append(f"{rel(md)}: {target} (no heading with that anchor in {dest.name})")
    return bad


def test_relative_links_resolve():
    assert markdown_files(), "no Markdown file found"
    bad = [b for md in markdown_files() for b in broken_links(md)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_link_check_catches_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A page\n\n## 2. A section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#2-a-section) [ok](#title) [web](https://x.org/none.md)\n"
                    "`[code](nowhere.md)`\n# Title\n")
    assert broken_links(page) == []
    page.write_text("# Title\n[a](missing.md) [b](there.md#3-no-section) [c](#no-title)\n")
    assert len(broken_links(page)) == 3


def test_github_anchors():
    text = "# LMTTM: a model\n## 1. Input and stem\n### `official_compat`: the original, on request\n## Results\n" \
           "## Results\n```\n# not a heading\n```\n"
    assert anchors(text) == {"lmttm-a-model", "1-input-and-stem", "official_compat-the-original-on-request",
                             "results", "results-1"}


# ---------------------------------------------------------------------------------------------------------------
# The specification: its structure, and every § reference in the project


def spec_structure(text: str) -> dict[int, set[int]]:
    """Section number -> the item numbers of the numbered lists in that section (top-level `M.` lines)."""
    sections: dict[int, set[int]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"## (\d+)\. \S", line):
            current = int(m.group(1))
            assert current not in sections, f"section {current} twice"
            sections[current] = set()
        elif current is not None and (m := re.match(r"(\d+)\. \S", line)):
            sections[current].add(int(m.group(1)))
    return sections


def load_specs() -> dict[str, dict[int, set[int]]]:
    return {name: spec_structure((SPEC_DIR / f"{name}.md").read_text()) for name in SPEC_NAMES}


def expand(m: re.Match) -> list[tuple[int, int | None]]:
    """The (section, item) pairs one reference names; item None = the whole section."""
    a, ai = int(m.group(1)), m.group(2) and int(m.group(2))
    if m.group(4) is None:
        return [(a, ai)]
    b, bi = int(m.group(4)), m.group(5) and int(m.group(5))
    if ai is not None and m.group(3) is None and bi is None:
        b, bi = a, b  # N.M-K: items M to K of section N
    if (ai is None) != (bi is None) or (b, bi or 0) <= (a, ai or 0):
        return [(-1, None)]  # malformed range: reported as a missing section
    if ai is None:
        return [(s, None) for s in range(a, b + 1)]
    if a == b:
        return [(a, i) for i in range(ai, bi + 1)]
    return [(a, ai), (b, bi)]


def bad_references(text: str, own: str | None, specs: dict[str, dict[int, set[int]]]) -> list[str]:
    """Each § reference of `text` that cites no spec file unambiguously, or a section/item its spec lacks."""
    named = set(SPEC_NAME.findall(text)) | ({own} if own else set())
    default = next(iter(named)) if len(named) == 1 else None
    bad = []
    for no, line in enumerate(text.splitlines(), 1):
        for m in SPEC_REF.finditer(line):
            before = SPEC_NAME.findall(line[:m.start()])
            spec = before[-1] if before else default
            if spec is None:
                bad.append(f"line {no}: {m.group(0)} names no spec file (this file names {sorted(named)})")
                continue
            for section, item in expand(m):
                if section not in specs[spec] or (item is not None and item not in specs[spec][section]):
                    where = f"§{section}" if item is None else f"§{section}.{item}"
                    bad.append(f"line {no}: {m.group(0)}: {spec}.md has no {where}")
    return bad


def test_spec_sections_are_numbered_one_to_n():
    for name, sections in load_specs().items():
        assert list(sections) == list(range(1, len(sections) + 1)), f"{name}.md: sections {list(sections)}"
        assert sections, f"{name}.md has no numbered section"


def test_docs_pages_start_with_what_they_are_for():
    pages = [p for p in markdown_files() if rel(p).startswith("docs/")]
    assert {p.stem for p in pages} >= set(SPEC_NAMES)
    for page in pages:
        title, opening = (page.read_text().split("\n\n") + [""])[:2]
        assert title.startswith("# ") and "\n" not in title, f"{rel(page)} must start with its title line"
        assert opening.strip() and not re.match(r"\s*([#|>*-]|```|\d+\.)", opening), \
            f"{rel(page)}: the title must be followed by a paragraph saying what the page is for"


def test_every_spec_reference_names_a_section_that_exists():
    specs = load_specs()
    bad, count = [], 0
    for path in text_files():
        text = path.read_text()
        count += len(SPEC_REF.findall(text))
        own = path.stem if path.parent == SPEC_DIR and path.stem in SPEC_NAMES else None
        bad += [f"{rel(path)}: {b}" for b in bad_references(text, own, specs)]
    assert count > 40, f"only {count} § references found: is the scan looking at the code?"
    assert not bad, "spec references:\n" + "\n".join(bad)


def test_reference_check_catches_bad_references():
    specs = {"LMTTM": {1: set(), 3: set(), 9: {1, 2, 3, 4, 5}}, "MAM": {3: {1, 2}}}
    good = "docs/spec/LMTTM.md \u00a71, \u00a79.1-5, \u00a79.1/\u00a79.3; docs/spec/MAM.md \u00a73.2\n"
    assert bad_references(good, None, specs) == []
    assert bad_references("spec \u00a73\nsee docs/spec/LMTTM.md", None, specs) == []  # the file's one spec
    assert len(bad_references("spec \u00a73\nsee docs/spec/LMTTM.md and docs/spec/MAM.md", None, specs)) == 1
    assert len(bad_references("spec \u00a73", None, specs)) == 1  # no spec named at all
    assert bad_references("spec \u00a73", "LMTTM", specs) == []  # a spec file names itself
    assert len(bad_references("docs/spec/LMTTM.md \u00a72", None, specs)) == 1
    assert len(bad_references("docs/spec/LMTTM.md \u00a79.4-7", None, specs)) == 2  # \u00a79.6, \u00a79.7
    assert len(bad_references("docs/spec/LMTTM.md \u00a71-\u00a73", None, specs)) == 1  # \u00a72 inside the range
    assert len(bad_references("docs/spec/MAM.md \u00a73.3 docs/spec/LMTTM.md \u00a79.3", None, specs)) == 1


# ---------------------------------------------------------------------------------------------------------------
# No path of the development machine


def test_no_development_machine_paths():
    bad = []
    for path in text_files():
        patterns = DEV_PATHS_TESTS if rel(path).startswith("tests/") else DEV_PATHS
        for no, line in enumerate(path.read_text().splitlines(), 1):
            bad += [f"{rel(path)}:{no}: {p}" for p in patterns if p in line]
    assert not bad, "paths a clone does not have:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------------
# The README's set-up commands are CI's


def commands(line: str) -> list[list[str]]:
    """`a && b` -> [[a's words], [b's words]], with `python3` read as `python`."""
    out = []
    for part in line.split("&&"):
        words = shlex.split(part)
        if words and words[0] == "python3":
            words[0] = "python"
        out.append(words)
    return out


def ci_commands(script: str) -> list[list[str]]:
    lines = [ln.strip() for ln in script.splitlines()]
    return [c for ln in lines if ln and not ln.startswith(("#", "set ", "cd ")) for c in commands(ln)]


def readme_bash_lines(text: str) -> list[str]:
    return [ln.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()]


def test_readme_setup_commands_are_what_ci_runs():
    ci = ci_commands((REPO / ".ci" / "run").read_text())
    bash = readme_bash_lines((REPO / "README.md").read_text())
    tests = [commands(ln) for ln in bash if "pytest" in ln and "pip install" in ln]
    assert tests == [ci], f"README's install-and-test line {tests} is not what .ci/run runs: {ci}"
    installs = [commands(ln) for ln in bash if "pip install -r" in ln and "pytest" not in ln]
    assert installs, "README has no install line"
    pip = next(c for c in ci if c[:2] == ["pip", "install"])
    for cmds in installs:
        i = next(i for i, c in enumerate(cmds) if c[:2] == ["pip", "install"])
        assert cmds[:i] == ci[:ci.index(pip)], f"README's install line sets up differently from .ci/run: {cmds}"
        assert pip[:len(cmds[i])] == cmds[i], f"README installs {cmds[i]}, .ci/run {pip}"


def test_command_comparison():
    ci = ci_commands("set -e\ncd x\n# c\npython3 -m venv .venv\n. .venv/bin/activate\npip install -r r.txt m\n")
    assert ci == [["python", "-m", "venv", ".venv"], [".", ".venv/bin/activate"],
                  ["pip", "install", "-r", "r.txt", "m"]]
    assert commands("python -m venv .venv && . .venv/bin/activate && pip install -r r.txt m") == ci


# ---------------------------------------------------------------------------------------------------------------
# The README's commands run as written once DATA is replaced; what the code imports is installed by the README


DATA_OPTIONS = re.compile(r"(--data[.-]root[ =]|data\.root=)(\S+)")


def readme_commands_with_code_spans(text: str) -> list[str]:
    """Lines of the bash blocks and the inline code spans that run a script (python/torchrun ...)."""
    spans = [m for m in re.findall(r"`([^`\n]+)`", strip_fences(text)) if m.startswith(("python", "torchrun"))]
    return readme_bash_lines(text) + spans


def strip_fences(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def data_roots(text: str) -> list[tuple[str, str]]:
    return [(line, m.group(2)) for line in readme_commands_with_code_spans(text) for m in DATA_OPTIONS.finditer(line)]


def test_readme_commands_name_the_data_folder_DATA_explained_before_its_first_use():
    text = (REPO / "README.md").read_text()
    uses = data_roots(text)
    assert len(uses) >= 5, "the README's data commands were not found"
    pages = [REPO / "REPRODUCTION.md", *sorted((REPO / "docs").glob("*.md"))]
    page_uses = [(f"{p.name}: {line}", value) for p in pages for line, value in data_roots(p.read_text())]
    assert len(page_uses) >= 10, "the docs' data commands were not found"
    bad = [line for line, value in uses + page_uses if value.strip("`'\"") != "DATA"]
    assert not bad, "commands with another data folder than the placeholder DATA:\n" + "\n".join(bad)
    phrase = "`DATA` in the commands below stands for the folder that holds the MedMNIST `.npz` files"
    explained = text.find(phrase)
    first_use = min(text.find(line) for line, _ in uses)
    assert 0 <= explained < first_use, "DATA must be explained (once) before the first command that uses it"
    assert "`DATA` in the commands below" not in text[explained + len(phrase):]


def test_the_data_placeholder_check_catches_other_folders():
    text = "**`DATA` in the commands below**\n```bash\npython train.py x --data.root ~/data\n```\n" \
           "and `python tools/sweep.py g --override data.root=/srv/medmnist` and `--data-root DATA`"
    assert [v for _, v in data_roots(text)] == ["~/data", "/srv/medmnist"]


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow"}
OPTIONAL_IMPORTS = {"mamba_ssm"}  # MedMamba's CUDA kernels, used only when importable (model/selective_scan.py)


def imported_packages() -> dict[str, str]:
    """Third-party top-level packages the project's code imports anywhere (function bodies included) -> a file."""
    import ast
    import sys

    local = {"engine", "model", "data", "tools", "tests", "__future__"}
    found = {}
    for path in tracked_files():
        if path.suffix != ".py" or rel(path).startswith("tests/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, rel(path))
    return found


def test_requirement_txt_installs_everything_the_code_imports():
    from importlib.metadata import PackageNotFoundError, requires

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    pinned = {norm(ln.split("==")[0]) for ln in (REPO / "requirement.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")}
    through = set()  # what the pinned packages themselves depend on (their installed metadata)
    for dist in pinned:
        try:
            through |= {norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires(dist) or []
                        if "extra ==" not in r}
        except PackageNotFoundError:
            pass
    imports = imported_packages()
    assert "matplotlib" in imports and "torch" in imports
    missing = {mod: where for mod, where in imports.items() if mod not in OPTIONAL_IMPORTS
               and norm(DISTRIBUTIONS.get(mod, mod)) not in pinned | through}
    assert not missing, f"imported but not installed by requirement.txt: {missing}"
    readme = (REPO / "README.md").read_text()
    assert "only needed by the plotting tests" not in readme and "pip install matplotlib`" not in readme

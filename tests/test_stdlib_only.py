"""Hygiene of the repository: runtime code uses the standard library only, and every project
has its README and its test file (spec/common.md "Layout"; shared/tools/contract_check.py).

The import check reads the source with `ast` (nothing is imported or run): an `import x` or
`from x import y` at any depth must name a standard-library module (`sys.stdlib_module_names`)
that still exists in Python 3.13, or one of the project's own packages.
"""
import ast
import sys

import pytest

from tests.harness import ROOT
from tests.projects import existing_projects

LOCAL = {"lib"} | {f"level{n:02d}" for n in range(1, 8)}
# In sys.stdlib_module_names of 3.11 but removed in 3.12 (PEP 632, PEP 594) or 3.13 (PEP 594).
REMOVED = {"asynchat", "asyncore", "distutils", "imp", "smtpd",
           "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "lib2to3", "mailcap",
           "msilib", "nis", "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau",
           "telnetlib", "uu", "xdrlib"}
RUNTIME_DIRS = ["lib"] + [f"level{n:02d}" for n in range(1, 8)]
RUNTIME_FILES = sorted(path for folder in RUNTIME_DIRS if (ROOT / folder).is_dir()
                       for path in (ROOT / folder).rglob("*.py")
                       if "__pycache__" not in path.parts)


def imported_modules(path):
    """(line, module name) for every absolute import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, "id", getattr(node.func, "attr", None))
              in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            yield node.lineno, node.args[0].value


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(ROOT)))
                                  for p in RUNTIME_FILES])
def test_runtime_code_imports_only_the_standard_library(path):
    bad = []
    for lineno, name in imported_modules(path):
        top = name.split(".")[0]
        if top in LOCAL:
            continue
        if top not in sys.stdlib_module_names:
            bad.append(f"{path.relative_to(ROOT)}:{lineno}: imports {name}, "
                       f"not the standard library")
        elif top in REMOVED:
            bad.append(f"{path.relative_to(ROOT)}:{lineno}: imports {name}, "
                       f"removed from Python 3.12/3.13")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("project", [pytest.param(p, id=p.name) for p in existing_projects()])
def test_project_has_readme_and_tests(project):
    assert (ROOT / project.readme).is_file(), f"{project.script}: no README {project.readme}"
    assert (ROOT / project.test_file).is_file(), f"{project.script}: no {project.test_file}"
    level_readme = ROOT / f"level{project.level:02d}" / "README.md"
    assert level_readme.is_file(), f"no {level_readme.relative_to(ROOT)} (the level's goal)"


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the README's test command (install the test requirements, then
    pytest), so what a newcomer types is what CI proves."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if "pytest" in line
                and not line.lstrip().startswith("#")]
    readme = ROOT / "README.md"
    assert readme.is_file(), "no README.md at the repository root"
    documented = [line.strip() for line in readme.read_text(encoding="utf-8").splitlines()
                  if line.startswith("    ") and "python -m pytest -q" in line]
    assert len(documented) == 1, f"README.md should give one test command, found {documented}"
    assert documented[0].startswith("python -m pip install -r requirements-dev.txt"), documented
    assert documented[0].endswith("&& python -m pytest -q"), documented
    assert commands == [documented[0].replace("pip install -r", "pip install -q -r")], commands

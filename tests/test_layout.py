"""The layout the README draws: the library never imports bench/, every module reads in one sitting, and the
command-line options come from the config dataclasses' fields and the comments beside them."""
import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

import cli

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(p for p in REPO.rglob("*.py") if p.relative_to(REPO).parts[0] not in ("tests", ".git"))


def imported(path):
    """The top-level names of the modules that `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_module_imports_bench():
    library = [p for p in MODULES if p.relative_to(REPO).parts[0] != "bench" and p.name != "benchmark.py"]
    assert len(library) > 20
    assert [str(p.relative_to(REPO)) for p in library if "bench" in imported(p) or "benchmark" in imported(p)] == []


def test_every_module_reads_in_one_sitting():
    long = {str(p.relative_to(REPO)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


@dataclass(frozen=True)
class Example:
    steps: int = 10  # optimizer steps: enough for a test
    rate: float | None = None  # the rate; None: chosen
    #                            by the run
    flag: bool = False  # a switch
    sizes: tuple = (1.0, 2.0)


def test_options_come_from_the_fields_and_their_comments():
    parser = argparse.ArgumentParser()
    cli.add_options(parser, Example, ("steps", "rate", "flag", "sizes"))
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["steps"] == "optimizer steps: enough for a test (default 10)"
    assert helps["rate"] == "the rate; None: chosen by the run"
    assert helps["sizes"] == "(default 1.0 2.0)"
    args = parser.parse_args(["--rate", "0.5", "--flag", "--sizes", "3", "4"])
    assert cli.config_from(Example, args) == Example(10, 0.5, True, [3.0, 4.0])
    assert cli.config_from(Example, parser.parse_args([])) == Example()

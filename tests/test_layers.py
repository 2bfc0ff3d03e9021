"""The package's layers, as ARCHITECTURE.md draws them: imports point down only, every
module stays readable in one sitting, and the modules that must not need torch don't."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "qdistill"
MAX_LINES = 400


def architecture_table() -> dict[str, tuple[int, set[str]]]:
    """ARCHITECTURE.md's layer table: {layer: (rank, module files)}. Top-level rows name
    modules: those of rank 0 form the layer ``base``, the others a layer each."""
    out = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        rank, folder, mods = int(cells[0]), cells[1].strip("`"), set(re.findall(r"`(\w+\.py)`", cells[3]))
        if folder == "top level":
            for m in mods:
                name = "base" if rank == 0 else m[:-3]
                out[name] = (rank, out.get(name, (rank, set()))[1] | {m})
        else:
            out[folder.rstrip("/")] = (rank, mods)
    return out


# Lower rank = lower layer. A module may import its own layer (folder) and any lower one.
RANK = {name: rank for name, (rank, _) in architecture_table().items()}


# the top-level modules everything may use: the rank-0 row of the table
BASE = {m[:-3] for m in architecture_table()["base"][1]} | {"__init__"}


def layer(module: str) -> str:
    """``qdistill.training.loop`` -> ``training``; ``qdistill.cli`` -> ``cli``;
    ``qdistill.errors`` (and the package itself) -> ``base``."""
    parts = module.split(".")
    return "base" if len(parts) == 1 or parts[1] in BASE else parts[1]


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        yield path, name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports(path: Path, name: str):
    """Every qdistill module ``path`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "qdistill")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "qdistill":
                # `from . import x` may name a submodule: count the deepest module that exists
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    yield sub if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists() \
                        or (SRC.parent / Path(*sub.split("."))).is_dir() else target


def test_every_module_belongs_to_a_layer():
    assert {layer(n) for _, n in modules()} <= set(RANK)


def test_architecture_lists_every_module_where_it_is():
    table = architecture_table()
    assert {"base", "nn", "data", "training", "study", "report", "export", "deploy", "bench", "cli"} <= set(table)
    found: dict[str, set[str]] = {}
    for path, name in modules():
        if path.name != "__init__.py":
            found.setdefault(layer(name), set()).add(path.name)
    assert found == {name: mods for name, (_, mods) in table.items()}


def upward_imports(path: Path, name: str) -> list[str]:
    """The imports of module ``name`` (file ``path``) that point to its own rank or above,
    outside its own layer."""
    mine, bad = layer(name), []
    for target in imports(path, name):
        theirs = layer(target)
        if theirs != mine and RANK[theirs] >= RANK[mine]:
            bad.append(f"{name} imports {target} ({mine} {RANK[mine]} -> {theirs} {RANK[theirs]})")
    return bad


def test_imports_point_down_only():
    bad = [line for path, name in modules() for line in upward_imports(path, name)]
    assert not bad, "\n".join(bad)


def test_the_check_can_fail(tmp_path):
    """The checker flags a relative import upward inside a function and a same-rank
    sibling's import, and passes a downward one."""
    f = tmp_path / "loop.py"
    f.write_text("def f():\n    from ..study.run import run_study\nfrom ..report import plots\n"
                 "from ..nn.models import build\n")
    bad = upward_imports(f, "qdistill.training.loop")
    assert sorted(bad) == ["qdistill.training.loop imports qdistill.report.plots (training 3 -> report 5)",
                           "qdistill.training.loop imports qdistill.study.run (training 3 -> study 4)"]
    g = tmp_path / "plots.py"
    g.write_text("from ..bench import machine\n")  # report and bench share rank 5
    assert upward_imports(g, "qdistill.report.plots") == ["qdistill.report.plots imports qdistill.bench.machine "
                                                          "(report 5 -> bench 5)"]


@pytest.mark.parametrize("path", [p for p, _ in modules()], ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


@pytest.mark.slow
def test_config_resolution_and_the_layers_enumerations_need_no_torch():
    code = ("import sys, qdistill.resolve, qdistill.training.rundir, qdistill.study.results; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- functions a reader can hold

MAX_FUNCTION_LINES, MAX_PARAMETERS = 60, 8
KERNELS = ("deploy/kernels.py", "deploy/numba_kernels.py")  # numeric kernels: flat argument lists


def functions(tree: ast.AST):
    """Every function: (name, line, lines from `def` to its end, parameters but self/cls)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [p for p in (a.vararg, a.kwarg) if p]
            if params and params[0].arg in ("self", "cls"):
                params = params[1:]
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1, len(params)


def too_long_or_wide(source: str) -> list[str]:
    return [f"{name} (line {line}): {n} lines, {p} parameters" for name, line, n, p in functions(ast.parse(source))
            if n > MAX_FUNCTION_LINES or p > MAX_PARAMETERS]


@pytest.mark.parametrize("path", [p for p, _ in modules() if not str(p).endswith(KERNELS)],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_over_60_lines_or_8_parameters(path):
    assert not too_long_or_wide(path.read_text())


def test_the_function_check_can_fail():
    long = "def f(a):\n" + "    x = 1\n" * 60
    wide = "class C:\n    def m(self, a, b, c, d, e, f, g, h, *rest):\n        pass\n"
    fine = "class C:\n    def m(self, a, b, c, d, e, f, g, h):\n        pass\n"
    assert too_long_or_wide(long) == ["f (line 1): 61 lines, 1 parameters"]
    assert too_long_or_wide(wide) == ["m (line 2): 2 lines, 9 parameters"]
    assert too_long_or_wide(fine) == []


# ---------------------------------------------------------------- one owner per folder layout

LAYOUT_OWNERS = ("training/rundir.py", "study/studydir.py")


def layout_names() -> set[str]:
    """The file names of a run's and a study's layout, as their owners define them."""
    from qdistill.study import studydir
    from qdistill.training import rundir
    return ({getattr(rundir, n) for n in ("CONFIG", "METRICS", "CHECKPOINT", "BEST", "SUMMARY", "ERROR")}
            | {getattr(studydir, n) for n in ("STUDY_CONFIG", "RESULTS", "TEACHER_JSON", "TEACHER_TEST",
                                               "LOGITS_CACHE", "REPORT_MD", "REPORT_HTML")})


def spelled_layout_names(source: str, names: set[str]) -> list[str]:
    """String constants (docstrings aside) that name a layout file."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return sorted({f"{name!r} (line {node.lineno})" for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                   for name in names if name in node.value})


def test_only_rundir_and_studydir_spell_a_layout_file_name():
    names, bad = layout_names(), []
    assert {"summary.json", "results.csv", "teacher_logits.pt"} <= names
    for path, _ in modules():
        if not str(path).endswith(LAYOUT_OWNERS):
            bad += [f"{path.relative_to(SRC)}: {s}" for s in spelled_layout_names(path.read_text(), names)]
    assert not bad, "\n".join(bad)


def test_the_layout_check_can_fail():
    names = {"summary.json"}
    src = '"""Writes summary.json."""\nX = "summary.json"\ndef f():\n    """summary.json"""\n    return f"{d}/summary.json"\n'
    assert spelled_layout_names(src, names) == ["'summary.json' (line 2)", "'summary.json' (line 5)"]


# ---------------------------------------------------------------- one scheme object

def scheme_comparisons(path: Path) -> list[str]:
    """Comparisons in ``path`` that pick a quantization scheme by name: a scheme's name
    as a string constant, or anything called ``scheme`` compared (``==``, ``!=``, ``in``)."""
    from qdistill.nn import SCHEMES

    def names_scheme(node) -> bool:
        return ((isinstance(node, ast.Constant) and node.value in SCHEMES)
                or (isinstance(node, ast.Name) and "scheme" in node.id)
                or (isinstance(node, ast.Attribute) and "scheme" in node.attr))
    return [f"{path.name}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Compare) and any(names_scheme(n) for n in [node.left, *node.comparators])]


def test_no_scheme_is_picked_by_name_outside_the_scheme_objects():
    """The schemes are objects (`qdistill.nn.schemes`); layers, models, quantize, export
    and ONNX ask them, never compare names."""
    bad = [line for path, _ in modules() if path != SRC / "nn" / "schemes.py" for line in scheme_comparisons(path)]
    assert not bad, "\n".join(bad)


def test_the_scheme_check_can_fail(tmp_path):
    g = tmp_path / "x.py"
    g.write_text('if m.scheme == "lsq":\n    pass\nok = kind in ("a", "b")\nif "homework" != s:\n    pass\n')
    assert scheme_comparisons(g) == ["x.py:1: m.scheme == 'lsq'", "x.py:4: 'homework' != s"]


# ---------------------------------------------------------------- docs that name what the code has

README_MAX_LINES = 250


def registered_names() -> dict[tuple[str, str], tuple[str, ...]]:
    """{(section, key): the names the code registers for that key}, read from the registries."""
    from qdistill.data import DATASETS
    from qdistill.nn import KD_TERMS, SCHEMES
    from qdistill.training.recipes import RECIPES
    return {("data", "dataset"): tuple(DATASETS), ("student", "scheme"): tuple(SCHEMES),
            ("student", "kd"): tuple(KD_TERMS), ("study", "kd"): tuple(KD_TERMS), ("train", "recipe"): tuple(RECIPES)}


def key_text(toml: str, section: str, key: str) -> str:
    """The line of ``[section] key = ...`` in a commented TOML file and the comment lines
    that continue it (indented ``#`` lines right below); "" when the key is absent."""
    out, current = [], None
    for line in toml.splitlines():
        if out and re.match(r"^\s+#", line):
            out.append(line)
        elif out:
            break
        elif re.match(r"^\[\w+\]", line):
            current = line.strip()[1:-1]
        elif current == section and re.match(rf"^{re.escape(key)}\s*=", line):
            out.append(line)
    return "\n".join(out)


def unnamed(names, text: str, code_span: bool = False) -> list[str]:
    """The ``names`` that ``text`` never spells as a word (as a Markdown code span with
    ``code_span``)."""
    def found(n):
        return f"`{n}`" in text if code_span else re.search(rf"(?<![\w+-]){re.escape(n)}(?![\w+-])", text)
    return [n for n in names if not found(n)]


def test_readme_and_default_toml_name_every_registered_choice():
    """Every scheme, kd term, recipe and dataset the code registers is named in README.md
    (as `name`) and in configs/default.toml on its key's line or the comments continuing it."""
    readme, toml = (ROOT / "README.md").read_text(), (ROOT / "configs" / "default.toml").read_text()
    bad = []
    for (section, key), names in registered_names().items():
        bad += [f"README.md does not name {section}.{key} {n!r}" for n in unnamed(names, readme, code_span=True)]
        bad += [f"configs/default.toml [{section}] {key} does not name {n!r}"
                for n in unnamed(names, key_text(toml, section, key))]
    assert not bad, "\n".join(bad)


def test_readme_is_at_most_250_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_the_naming_check_can_fail():
    toml = ('[student]\nscheme = "dorefa"   # dorefa, homework\n                   # lsq (learned)\n'
            'loss = "hard"   # hard, lsqx\n[train]\nscheme = 1   # lsq2\n')
    assert key_text(toml, "student", "scheme").count("\n") == 1
    assert unnamed(("dorefa", "lsq", "lsq2", "made-up"), key_text(toml, "student", "scheme")) == ["lsq2", "made-up"]
    assert unnamed(("dorefa", "hard"), "uses `dorefa` and hard", code_span=True) == ["hard"]
    assert key_text(toml, "student", "missing") == ""

"""The layer map of course_lib/README.md, checked by reading every import of every module.

A module may import from its own layer or from the layers above it, never from a layer below, and no
chain of imports may lead back to where it started. The imports are read with ``ast``, not run: those
inside functions and under ``if TYPE_CHECKING:`` count too, since a reader follows them all the same.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "course_lib"

# The drawing in course_lib/README.md, top to bottom: each layer's top-level modules and packages.
LAYERS = (
    ("backend", {"__init__", "backend"}),
    ("dtypes, compile, emulator", {"dtypes", "compile", "emulator"}),
    ("kernels", {"kernels"}),
    ("distributed", {"distributed"}),
    ("checkpoint", {"checkpoint"}),
    ("engine, models", {"engine", "models"}),
    ("bench, check, env, device_facts, labs", {"bench", "check", "env", "device_facts", "labs"}),
    ("scaling", {"scaling"}),
)


def module_name(path: Path) -> str:
    """``course_lib/kernels/norm.py`` -> ``course_lib.kernels.norm``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of a ``course_lib`` module, from its top-level name (``course_lib`` itself: ``__init__``)."""
    top = module.split(".")[1] if "." in module else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} is in no layer: add {top!r} to LAYERS here and to course_lib/README.md's drawing")


def imported_modules(module: str) -> set[str]:
    """The ``course_lib`` modules that ``module`` imports anywhere in its file.

    ``from course_lib.kernels import norm`` imports the module ``course_lib.kernels.norm``;
    ``from course_lib.bench import run_suite`` imports the package ``course_lib.bench`` (its ``__init__.py``).
    """
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # a relative import: count up from this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            found |= {f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                      for alias in node.names}
    return {name for name in found if name in MODULES}


IMPORTS = {module: imported_modules(module) for module in MODULES}


def describe(module: str) -> str:
    return f"{MODULES[module].relative_to(PACKAGE.parent)} ({LAYERS[layer_of(module)][0]})"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_layer_below_its_own():
    upward = [f"{describe(module)} imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in IMPORTS.items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "imports from a later layer:\n  " + "\n  ".join(upward)


def find_cycles() -> list[list[str]]:
    """Every import cycle a depth-first search meets, each as the chain of modules that closes it."""
    cycles, finished, path = [], set(), []

    def visit(module: str) -> None:
        path.append(module)
        for target in sorted(IMPORTS[module]):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in finished:
                visit(target)
        path.pop()
        finished.add(module)

    for module in MODULES:
        if module not in finished:
            visit(module)
    return cycles


def test_no_import_cycles():
    cycles = [" -> ".join(cycle) for cycle in find_cycles()]
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)

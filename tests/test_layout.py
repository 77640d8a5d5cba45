"""The package's arrows only point down: read from the source (every import, function-level ones
included), not from what happens to be imported at run time.

Floors, bottom up: errors and signals; the model (vision, siglip, s2, projector, language, merge,
anyres, model); inputs and checkpoints; generation; serving; the command lines.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llava_mlx"
MODEL_FILES = {"vision", "siglip", "s2", "projector", "language", "merge", "anyres", "model"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set, top: str = "llava_mlx") -> set:
    """Every module of the package `top` that `name` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(top)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith(top):
                target = node.module
            else:
                continue
            # `from .pkg import mod` imports a module; `from .mod import name` the module itself
            submodules = {f"{target}.{a.name}" for a in node.names} & known
            found |= submodules or {target}
    return {m for m in found if m in known and m != name}


def graph(package: Path = PACKAGE) -> dict:
    mods = modules(package)
    return {name: imports_of(name, path, set(mods), package.name) for name, path in mods.items()}


def short(name: str) -> str:
    return name[len("llava_mlx.") :] if name.startswith("llava_mlx.") else name


def assert_no_cycle(edges: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " → ".join(map(short, cycle)))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_import_cycle():
    assert_no_cycle(graph())


def test_no_cycle_between_floors():
    """Subpackages taken whole (checkpoint/, server/, distributed/, cli/, train/): no two import
    each other, nor a subpackage and a module, either way (processor.py and checkpoint/ did)."""

    def unit(name):
        parts = short(name).split(".")
        return parts[0] if len(parts) > 1 else short(name)

    edges = {}
    for name, targets in graph().items():
        edges.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) != unit(name))
    assert_no_cycle(edges)


def test_the_benchmarks_import_no_cycle():
    assert_no_cycle(graph(PACKAGE.parent / "benchmarks"))


def test_model_files_import_only_the_model():
    allowed = {f"llava_mlx.{m}" for m in MODEL_FILES} | {"llava_mlx.errors"}
    for name, targets in graph().items():
        if short(name) in MODEL_FILES:
            assert targets <= allowed, f"{short(name)} reaches up to {sorted(map(short, targets - allowed))}"


def test_serving_and_command_lines_are_at_the_top():
    for name, targets in graph().items():
        floor = short(name).split(".")[0]
        for target in targets:
            top = short(target).split(".")[0]
            if top == "cli":
                assert floor in ("cli", "__main__"), f"{short(name)} imports the command line {short(target)}"
            if top == "server":
                assert floor in ("server", "cli"), f"{short(name)} imports the server's {short(target)}"
            if floor == "checkpoint":
                assert top not in ("generation", "cache"), f"{short(name)} imports {short(target)}"


def test_the_test_sees_function_level_imports(tmp_path):
    """The parser catches an import inside a function (the kind that hid the old cycles)."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from .model import LlavaModel\n")
    assert imports_of("llava_mlx.x", source, {"llava_mlx.model"}) == {"llava_mlx.model"}


def test_importing_the_package_is_cheap():
    """`import llava_mlx` loads neither MLX nor transformers; the first use of `load` does."""
    code = (
        "import sys, llava_mlx\n"
        "heavy = [m for m in ('mlx.core', 'mlx_lm', 'transformers', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(llava_mlx.load) and 'mlx.core' in sys.modules\n"
        "assert sorted(llava_mlx.__all__) == ['LlavaError', 'convert', 'generate', 'load', 'stream_generate']\n"
        "import llava_mlx.generation, llava_mlx.checkpoint.convert, llava_mlx.checkpoint.load\n"
        "for name in llava_mlx.__all__:  # still the functions once their modules are imported\n"
        "    assert not isinstance(getattr(llava_mlx, name), type(sys)), name\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

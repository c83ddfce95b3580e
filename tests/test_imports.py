"""The import graph of mlx_clip and torch_ref, read from the source with `ast` (nothing is imported).

Every `import` and `from ... import` counts, at module level or inside a function, with relative
imports resolved; `from package import name` is an edge to package.name where that is a module,
else to the package. Data flows one way (CLI -> config -> data -> model -> loss -> step ->
checkpoint): no cycles, the library never reaches the training program, the framework-free modules
load no framework, and torch_ref does not lean on MLX's training program. The rules follow edges
transitively, and a failure names the chain of modules.
"""

import ast
from collections import deque
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mlx_clip", "torch_ref")

LIBRARY = ("mlx_clip.models", "mlx_clip.data", "mlx_clip.text", "mlx_clip.evaluation", "mlx_clip.interop")
PROGRAM = (
    "mlx_clip.training",
    "mlx_clip.train",
    "mlx_clip.eval",
    "mlx_clip.convert",
    "mlx_clip.export",
    "mlx_clip.predict",
    "mlx_clip.sweep",
    "mlx_clip.tuning",
)
FRAMEWORK_FREE = (
    "mlx_clip/schema.py",
    "mlx_clip/config.py",
    "mlx_clip/data/resolution.py",
    "mlx_clip/models/config.py",
    "mlx_clip/text/tokenizer.py",
    "mlx_clip/text/vocab.py",
    "mlx_clip/text/hf_tokenizer.py",
    "mlx_clip/text/clean.py",
    "mlx_clip/text/hf_dir.py",
    "mlx_clip/interop/layouts.py",
    "mlx_clip/interop/layouts_timm.py",
    "mlx_clip/run_args.py",
    "mlx_clip/models/init_table.py",
    "mlx_clip/models/locate.py",
    "mlx_clip/models/lora_config.py",
    "mlx_clip/training/optim_rules.py",
    "mlx_clip/training/state.py",
    "mlx_clip/training/temperature.py",
    "mlx_clip/training/patch_dropout.py",
    "mlx_clip/procs.py",
    "mlx_clip/run_history.py",
    "mlx_clip/sweep.py",  # a sweep's own process: its trials alone train
    "mlx_clip/tuning/space.py",
    "mlx_clip/tuning/trial.py",
    "mlx_clip/tuning/study.py",
    "mlx_clip/tuning/report.py",
)
FRAMEWORKS = ("mlx", "torch")
NOT_FOR_TORCH_REF = ("mlx_clip.training.loop", "mlx_clip.training.build", "mlx_clip.train")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, prefixes) -> bool:
    """`name` is one of the modules or packages in `prefixes`, or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported_names(module: str, path: Path, modules) -> set[str]:
    """Absolute dotted names of everything `module` imports, in any scope."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . / .. / .name import x
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


class Graph:
    """Edges between our own modules, and the top-level external packages each one imports."""

    def __init__(self):
        paths = {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
        self.modules = set(paths)
        self.edges: dict[str, set[str]] = {}
        self.external: dict[str, set[str]] = {}
        for module, path in paths.items():
            names = imported_names(module, path, self.modules)
            ours = {self.owner(n) for n in names}
            self.edges[module] = ours - {None, module}
            self.external[module] = {n.split(".")[0] for n in names if self.owner(n) is None}

    def owner(self, name: str) -> str | None:
        """The module of ours that `name` (a module, or a name inside one) belongs to."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def chain(self, start: str, is_target) -> list[str] | None:
        """The shortest import chain from `start` to a module for which is_target(module) holds."""
        parent = {start: None}
        queue = deque([start])
        while queue:
            module = queue.popleft()
            if is_target(module):
                path = []
                while module is not None:
                    path.append(module)
                    module = parent[module]
                return path[::-1]
            for dep in sorted(self.edges[module]):
                if dep not in parent:
                    parent[dep] = module
                    queue.append(dep)
        return None

    def reachable(self, start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for dep in self.edges[stack.pop()] - seen:
                seen.add(dep)
                stack.append(dep)
        return seen

    def cycles(self) -> list[list[str]]:
        """One shortest cycle per group of mutually importing modules, as a -> b -> ... -> a."""
        reach = {m: self.reachable(m) for m in self.modules}
        found, done = [], set()
        for module in sorted(self.modules):
            if module in reach[module] and module not in done:
                group = {m for m in reach[module] if module in reach[m]}  # module included
                done |= group
                back = [
                    self.chain(dep, lambda m, module=module: m == module)
                    for dep in self.edges[module] & group
                ]
                found.append([module, *min(back, key=len)])
        return found


@pytest.fixture(scope="module")
def graph():
    return Graph()


def test_the_graph_sees_every_kind_of_import(graph):
    """Relative (.kernels), parent-relative (..schema), absolute, and function-level imports."""
    assert "mlx_clip.models.kernels" in graph.edges["mlx_clip.models.transformer"]
    assert "mlx_clip.schema" in graph.edges["mlx_clip.models.config"]
    assert "mlx_clip.models.model" in graph.edges["mlx_clip.inference"]
    assert "mlx" in graph.external["mlx_clip.models.kernels"]
    assert "mlx_clip.interop.open_clip" in graph.edges["mlx_clip.convert"]  # inside main()


def test_no_import_cycles(graph):
    cycles = graph.cycles()
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_library_never_imports_the_training_program(graph):
    """models, data, text, evaluation and interop never reach mlx_clip.training or a CLI module."""
    chains = [
        graph.chain(m, lambda x: within(x, PROGRAM)) for m in sorted(graph.modules) if within(m, LIBRARY)
    ]
    chains = [" -> ".join(c) for c in chains if c]
    assert not chains, "the library imports the training program:\n" + "\n".join(chains)


@pytest.mark.parametrize("relpath", FRAMEWORK_FREE)
def test_framework_free_modules_import_no_framework(graph, relpath):
    if not (REPO / relpath).is_file():
        pytest.skip(f"{relpath} does not exist yet")
    module = module_name(REPO / relpath)
    chain = graph.chain(module, lambda m: bool(graph.external[m] & set(FRAMEWORKS)))
    if chain:
        framework = sorted(graph.external[chain[-1]] & set(FRAMEWORKS))
        pytest.fail(f"{relpath} imports {' and '.join(framework)}: {' -> '.join([*chain, *framework])}")


def test_torch_ref_does_not_import_the_mlx_training_program(graph):
    starts = sorted(m for m in graph.modules if within(m, ("torch_ref",)))
    chains = [graph.chain(m, lambda x, t=t: within(x, (t,))) for m in starts for t in NOT_FOR_TORCH_REF]
    chains = [" -> ".join(c) for c in chains if c]
    assert not chains, "torch_ref imports MLX's training program:\n" + "\n".join(chains)

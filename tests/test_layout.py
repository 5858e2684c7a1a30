"""The package's shape: imports run one way, the steps need only JAX, modules read in one sitting.

The import graph is read from the source (every `import`, at module level or inside a function),
so a cycle hidden in a function-level import is caught too.
"""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "m2net_jax")

# An import hook that makes the named top-level packages unimportable, as on a machine that has
# JAX, Flax, Optax and NumPy but not the data stack.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = path
    return found


def _imports(module: str, path: str, known) -> set[str]:
    """The package modules `module` imports (resolving relative and `from x import y`)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            # The longest known module that `name` is or lies in.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("m2net_jax"):
                out.add(name)
    return out


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph):
    """A list of modules forming an import cycle, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package importing its own submodules (re-exports) is not a cycle of the layout.
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_package_imports_have_no_cycle():
    assert _cycle(_graph()) is None


@pytest.mark.parametrize(
    "lower, higher",
    [
        ("m2net_jax.state", "m2net_jax.steps"),
        ("m2net_jax.steps", "m2net_jax.checkpoint"),
        ("m2net_jax.checkpoint", "m2net_jax.evaluate"),
        ("m2net_jax.evaluate", "m2net_jax.train"),
    ],
)
def test_imports_run_one_way(lower, higher):
    """A lower room never reaches a higher one, directly or through others."""
    graph = _graph()
    reach, todo = set(), [lower]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in reach:
                reach.add(nxt)
                todo.append(nxt)
    assert higher not in reach


def _run_blocked(code: str, blocked) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER.format(blocked=sorted(blocked)) + code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,  # The smoke job takes ~2 min on 2 idle cores; a shared machine is slower.
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "EPATH_USE_TF": "false"},
        check=False,
    )


def test_steps_and_state_import_without_the_data_stack():
    blocked = {"tensorflow", "tensorflow_datasets", "grain", "clu", "ml_collections", "orbax"}
    code = textwrap.dedent(
        """
        from m2net_jax import state, steps
        import sys
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("OK")
        """
    )
    proc = _run_blocked(code, blocked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK"
    # The hook really blocks: importing the data stack under it fails.
    proc = _run_blocked("import grain", blocked)
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr


@pytest.mark.slow
def test_smoke_job_trains_and_evaluates_without_tensorflow(smoke_data_dir, tmp_path):
    """main.py: train, then eval mode, from a dataset built beforehand, TensorFlow unimportable."""
    workdir = tmp_path / "w"
    args = [
        "m2net_jax.main",
        "--config=m2net_jax/configs/r47.py:smoke",
        "--config.recognizer.depth=29",
        f"--config.data.data_dir={smoke_data_dir}",
        f"--workdir={workdir}",
    ]
    code = textwrap.dedent(
        f"""
        import runpy
        sys.argv = {args!r} + sys.argv[1:]
        try:
            runpy.run_module("m2net_jax.main", run_name="__main__")
        finally:
            leaked = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
            assert not leaked, leaked
        """
    )
    trained = _run_blocked(code, {"tensorflow"})
    assert trained.returncode == 0, trained.stderr[-5000:]
    for stage in ("pretrain", "policy", "finetune"):
        assert stage in trained.stdout  # The results table.
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    # A console a person reads: a progress line per logged step, no library chatter.
    console = (trained.stdout + trained.stderr).splitlines()
    assert len(console) < 150, "\n".join(console)
    for stage in ("pretrain", "policy", "finetune"):
        assert any(f"[{stage}] step " in line and " ETA " in line for line in console)
    assert trained.stdout.count("finetune ") == 1  # One results table.
    evaluated = _run_blocked(
        code.replace("+ sys.argv[1:]", "+ ['--config.mode=eval']"), {"tensorflow"}
    )
    assert evaluated.returncode == 0, evaluated.stderr[-5000:]
    assert evaluated.stdout == trained.stdout  # Eval mode reproduces every number.


def _function_lengths():
    for module, path in _modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{module}.{node.name}", node.end_lineno - node.lineno + 1


def test_modules_and_functions_read_in_one_sitting():
    long_modules = {
        m: n
        for m, p in _modules().items()
        if (n := sum(1 for _ in open(p, encoding="utf-8"))) > 500
    }
    long_functions = {name: n for name, n in _function_lengths() if n > 90}
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_no_merge_conflict_markers_in_tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    names = [n.decode() for n in listed.stdout.split(b"\0") if n]
    if listed.returncode or not names:
        pytest.skip("not a git checkout")
    text_files = (".py", ".md", ".toml", ".txt", ".sh", ".ipynb", ".cfg", ".sbatch")
    found = []
    for name in names:
        if not name.endswith(text_files):
            continue
        with open(os.path.join(REPO, name), encoding="utf-8", errors="replace") as f:
            found += [
                f"{name}:{number}"
                for number, line in enumerate(f, 1)
                if line.startswith(("<<<<<<< ", ">>>>>>> "))
            ]
    assert not found, f"merge conflict markers left in: {found}"

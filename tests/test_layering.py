"""The package's layering, read from the source: no import cycle, models import no adapter code, nothing
below the recipes imports them, experiments import no experiment, and no family registers itself on import."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imports(path):
  """Every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def test_models_import_no_adapter_training_or_task_code():
  forbidden = ("rmlora_jax.adapters", "rmlora_jax.methods", "rmlora_jax.masking", "rmlora_jax.penalty",
               "rmlora_jax.budget", "rmlora_jax.training", "rmlora_jax.trainer", "rmlora_jax.tasks")
  files = sorted((ROOT / "rmlora_jax" / "models").glob("*.py"))
  assert len(files) >= 5
  for path in files:
    bad = sorted(m for m in imports(path) if m.startswith(forbidden))
    assert not bad, (path.name, bad)


def test_no_experiment_imports_another_and_no_library_module_imports_experiments():
  for path in sorted((ROOT / "experiments").glob("*.py")):
    assert not [m for m in imports(path) if m.startswith("experiments")], path.name
  for path in sorted((ROOT / "rmlora_jax").rglob("*.py")):
    assert not [m for m in imports(path) if m.startswith(("experiments", "configs"))], path


def test_library_modules_import_each_other_plainly():
  for path in sorted((ROOT / "rmlora_jax").rglob("*.py")):
    assert "import_module(" not in path.read_text(), path


def test_only_the_recipes_read_config_keys():
  """ml_collections is imported by the recipes (the experiment layer) and cli alone."""
  readers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rmlora_jax").rglob("*.py")
             if "ml_collections" in p.read_text()}
  recipes = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rmlora_jax" / "recipes").glob("*.py")}
  assert readers <= recipes | {"rmlora_jax/cli.py"}, readers - recipes
  assert "rmlora_jax/recipes/settings.py" in readers  # the check sees the package


def _module_name(path):
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph():
  """{module: the rmlora_jax modules it imports}, for every module of the package."""
  modules = {_module_name(p): p for p in (ROOT / "rmlora_jax").rglob("*.py")}
  return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_nothing_below_the_recipes_imports_them():
  graph = _graph()
  assert "rmlora_jax.recipes.glue" in graph
  for name, deps in graph.items():
    if not name.startswith("rmlora_jax.recipes"):
      assert not [d for d in deps if d.startswith("rmlora_jax.recipes")], name


def find_cycle(graph):
  """One import cycle of ``graph`` ({node: deps}) as a path that returns to its start; None if there is none."""
  state = {}

  def visit(name, stack):
    state[name] = "open"
    for dep in sorted(graph.get(name, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep, stack + [dep])
        if found:
          return found
    state[name] = "done"
    return None

  for name in sorted(graph):
    if name not in state:
      found = visit(name, [name])
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  # A package's __init__ imports its submodules; a submodule importing its own package is no cycle.
  graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in _graph().items()}
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
  # The checker finds a cycle where there is one, also one through the real graph.
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  graph["rmlora_jax.paths"] = graph["rmlora_jax.paths"] | {"rmlora_jax.adapters.lora"}
  assert find_cycle(graph)


def test_no_family_registers_itself_on_import():
  """A family module defines its FAMILY and writes into no other module's table; the registry lists them."""
  for path in sorted((ROOT / "rmlora_jax" / "adapters").glob("*.py")):
    tree = ast.parse(path.read_text())
    for node in tree.body:  # module-level statements only
      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        raise AssertionError(f"{path.name}: a call at import time, line {node.lineno}")
  registry = (ROOT / "rmlora_jax" / "adapters" / "registry.py").read_text()
  for family in ("lora", "adalora", "sora", "lora2"):
    assert f"{family}.FAMILY" in registry, family

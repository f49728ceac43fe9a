"""The package's layering, read from the source: models import no adapter code, experiments no experiment."""

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


def test_only_the_edge_reads_config_keys():
  """ml_collections is imported by the edge (experiment.py, the tasks' config functions) and cli alone."""
  readers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rmlora_jax").rglob("*.py")
             if "ml_collections" in p.read_text()}
  assert readers <= {"rmlora_jax/experiment.py", "rmlora_jax/tasks/glue.py", "rmlora_jax/tasks/squad.py", "rmlora_jax/tasks/sft.py",
                     "rmlora_jax/tasks/cifar.py", "rmlora_jax/cli.py"}, readers

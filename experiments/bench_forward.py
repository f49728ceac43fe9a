"""Times our jitted BERT forward against transformers' PyTorch BertModel on CPU.

Random weights (the same in both: ours are converted from the PyTorch model),
inference only (``torch.no_grad``), alternating runs, median of ``--runs``::

  python -m experiments.bench_forward --shape=minilm
  python -m experiments.bench_forward --shape=bert-base --runs=5

Prints a small table and one JSON line. Not a test: timings vary with load.
"""

import json
import statistics
import time

from absl import flags

from rmlora_jax import cli

SHAPES = {
    # hidden, layers, heads, intermediate
    "minilm": (384, 6, 12, 1536),
    "bert-base": (768, 12, 12, 3072),
}

_SHAPE = flags.DEFINE_enum("shape", "minilm", list(SHAPES), "Model size.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_RUNS = flags.DEFINE_integer("runs", 10, "Timed runs of each framework.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our compute dtype.")


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def bench(shape: str, batch: int, seq: int, runs: int, dtype: str) -> dict:
  """Median seconds per forward of ours and of PyTorch on the same random weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from rmlora_jax.models import bert  # pylint: disable=g-import-not-at-top

  hidden, layers, heads, inter = SHAPES[shape]
  config = transformers.BertConfig(
      hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=inter,
  )
  torch.manual_seed(0)
  torch_model = transformers.BertModel(config).eval()
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  params, _ = bert.params_from_state_dict(state, config, head="base")
  params = jax.tree.map(jnp.asarray, params)
  module = bert.module_from_hf_config(config, head="base", num_labels=2, dtype=getattr(jnp, dtype))

  rng = np.random.default_rng(0)
  ids = rng.integers(1000, config.vocab_size, size=(batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  mask[batch // 2 :, seq * 3 // 4 :] = 0  # some padding, as in real batches
  ours = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m)["last_hidden_state"])
  jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
  tids, tmask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

  run_ours = lambda: ours(params, jids, jmask).block_until_ready()
  def run_torch():
    with torch.no_grad():
      torch_model(input_ids=tids, attention_mask=tmask)

  compile_s = _timed(run_ours)
  run_torch()  # warm-up
  t_ours, t_torch = [], []
  for _ in range(runs):
    t_ours.append(_timed(run_ours))
    t_torch.append(_timed(run_torch))
  return {
      "shape": shape, "batch": batch, "seq": seq, "runs": runs, "dtype": dtype,
      "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
      "torch": torch.__version__, "compile_s": round(compile_s, 2),
      "ours_median_s": round(statistics.median(t_ours), 4),
      "torch_median_s": round(statistics.median(t_torch), 4),
      "ours_min_s": round(min(t_ours), 4), "torch_min_s": round(min(t_torch), 4),
  }


def main(argv):
  del argv
  r = bench(_SHAPE.value, _BATCH.value, _SEQ.value, _RUNS.value, _DTYPE.value)
  print(f"{'':10s} {'median s':>9s} {'min s':>8s}   ({r['shape']}, batch {r['batch']}, "
        f"seq {r['seq']}, {r['runs']} runs, torch threads {r['torch_threads']})")
  print(f"{'ours/jax':10s} {r['ours_median_s']:9.4f} {r['ours_min_s']:8.4f}   ({r['dtype']})")
  print(f"{'pytorch':10s} {r['torch_median_s']:9.4f} {r['torch_min_s']:8.4f}")
  print(json.dumps(r))


if __name__ == "__main__":
  cli.run(main)

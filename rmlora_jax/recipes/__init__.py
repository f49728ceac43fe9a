"""The experiment layer: a config in, a finished run out.

Everything that reads `ml_collections` config keys lives here, and nothing
else in `rmlora_jax` imports this package:

* `settings`: a config to the typed, validated settings the library takes.
* `run`: the workdir, `jax.distributed`, the model, the PEFT anchor, a saved run's config and checkpoint.
* `export`: a finished run written as a PEFT adapter folder or a merged Hugging Face model.
* one module per experiment: `glue`, `squad`, `sft`, `vision`, and `peft_anchor`
  (PEFT's LoRA and AdaLoRA on the same tasks, for comparison).

The `experiments/` entry points parse flags and call one of them.
"""

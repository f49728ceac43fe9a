"""Host-side data pipelines.

`glue` (GLUE loading and tokenising), `squad` (SQuAD v1.1 features and
answers), `sft` (prompt/response pairs for decoders), `images` (ImageFolder
and CIFAR data with augmentation), `batching` (length-bucketed batches for
every text task) and `cache` (token ids kept between runs). The GLUE and
batching names below are importable from here.
"""

from rmlora_jax.data.batching import TokenizedSplit, batch_plan, batches, bucket_lengths, num_batches, padding_fraction
from rmlora_jax.data.glue import TASKS, GlueTask, TextSplit, get_task, load_split, resolve_data_source, tokenize_split

__all__ = [
    "TASKS",
    "GlueTask",
    "TextSplit",
    "TokenizedSplit",
    "batch_plan",
    "batches",
    "bucket_lengths",
    "get_task",
    "load_split",
    "num_batches",
    "padding_fraction",
    "resolve_data_source",
    "tokenize_split",
]

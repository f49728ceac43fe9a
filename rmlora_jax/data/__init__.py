"""Host-side data pipelines: GLUE loading, tokenising and bucketed batching."""

from rmlora_jax.data.glue import (
    TASKS,
    GlueTask,
    TextSplit,
    TokenizedSplit,
    batch_plan,
    batches,
    bucket_lengths,
    get_task,
    load_split,
    num_batches,
    padding_fraction,
    resolve_data_source,
    tokenize_split,
)

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

"""Tasks: what a batch is, how it becomes model inputs, the loss, predictions and metrics.

`rmlora_jax.trainer` trains any object that satisfies `base.Task`. Ours:
text classification and regression (`classification`, the GLUE tasks),
extractive question answering (`qa`, SQuAD), instruction tuning of decoders
(`causal_lm`) and image classification (`vision`). The recipes
(`rmlora_jax.recipes`) build them from configs.
"""

"""Tasks: what a batch is, how it becomes model inputs, the loss, predictions and metrics.

`rmlora_jax.trainer` trains any object that satisfies `base.Task`; GLUE
classification and regression (`classification`, built from a config by
`glue`) are one such task.
"""

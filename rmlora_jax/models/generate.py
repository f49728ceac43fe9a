"""Text generation with a decoder's KV cache: greedy, sampled or nucleus, as transformers does.

`generate` takes any decoder of `rmlora_jax.models` that keeps a ``"cache"``
collection when called with ``decode=True`` (`llama.LlamaForCausalLM`,
`gemma.GemmaForCausalLM`); the whole loop is one jitted ``while_loop``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array



def init_cache(module: nn.Module, batch_size: int, max_length: int) -> Any:
  """An empty KV cache (the ``"cache"`` collection) for ``max_length`` tokens per row.

  Shapes come from `jax.eval_shape` of the module's init, so nothing but the
  zeros is computed.
  """
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(functools.partial(module.init, decode=True), jax.random.key(0), ids)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])



def _pick(logits: Array, key: Array, temperature: Array, top_p: Array, *, sample: bool,
          nucleus: bool) -> Array:
  """The next token of each row: the argmax, or a (nucleus) sample at ``temperature``."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if nucleus:
    # transformers' TopPLogitsWarper: keep the most likely tokens whose mass
    # before them is below top_p (the most likely one always).
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# Only what changes shapes or code is static: another end token, temperature
# or seed reuses the compiled loop.
@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "sample", "nucleus"))
def _generate(module, params, input_ids, attention_mask, key, eos, pad_token_id, temperature, top_p, *,
              max_new_tokens, sample, nucleus):
  pick = functools.partial(_pick, temperature=temperature, top_p=top_p, sample=sample, nucleus=nucleus)
  b, t = input_ids.shape
  cache = init_cache(module, b, t + max_new_tokens)
  step_fn = lambda cache, ids, mask: module.apply(
      {"params": params, "cache": cache}, ids, mask, decode=True, mutable=["cache"])
  logits, variables = step_fn(cache, input_ids, attention_mask)
  token = pick(logits[:, -1], jax.random.fold_in(key, 0))
  out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)

  def cond(state):
    step, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, token, done, out, cache = state
    logits, variables = step_fn(cache, token[:, None], jnp.ones((b, 1), jnp.int32))
    nxt = pick(logits[:, 0], jax.random.fold_in(key, step))
    # As transformers: a finished row gets padding.
    nxt = jnp.where(done, pad_token_id, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
    return step + 1, nxt, done | jnp.isin(nxt, eos), out, variables["cache"]

  state = (jnp.asarray(1, jnp.int32), token, done, out, variables["cache"])
  return jax.lax.while_loop(cond, body, state)[3]



def generate(
    module: nn.Module,
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | Array = 0,
) -> Array:
  """Continues a left-padded batch of prompts, greedily or by sampling, jitted.

  A prefill writes the prompts to a KV cache of ``T + max_new_tokens`` slots;
  a ``jax.lax.while_loop`` then feeds one token per step until every row has
  produced an end token or ``max_new_tokens`` tokens. Greedy decoding equals
  transformers' ``generate(do_sample=False)``. Params may hold
  `rmlora_jax.low_rank.LowRankKernel` kernels (adapters attached unmerged).

  Args:
    module: the decoder.
    params: its params.
    input_ids: (B, T) prompt ids, padded on the left.
    attention_mask: (B, T), 1 for real tokens; all ones if None.
    max_new_tokens: tokens to produce per row (a static shape).
    eos_token_id: the end token or tokens; None runs every row to the end.
    pad_token_id: what a row gets after its end token.
    temperature: 0 for greedy decoding; otherwise logits are divided by it
      and the next token is sampled.
    top_p: when sampling, only the most likely tokens holding this much
      probability are drawn from (nucleus sampling); 1 keeps all.
    seed: an int or a key; step ``i`` samples with ``fold_in(key, i)``.

  Returns:
    (B, max_new_tokens) int32: the new tokens only, ``pad_token_id`` after a
    row's end token.

  Raises:
    ValueError: a negative temperature, top_p outside (0, 1],
      max_new_tokens < 1, or right padding (a prompt whose last token is padding).
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not temperature >= 0.0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  try:
    right_padded = not np.all(np.asarray(attention_mask)[:, -1] > 0)
  except jax.errors.TracerArrayConversionError:  # called under jit: cannot check
    right_padded = False
  if right_padded:
    raise ValueError("generate: the prompts must be padded on the left (tokenizer.padding_side = "
                     "'left'), but some row's last token is padding")
  # No end token: -1, which no token equals (one shape for both cases).
  eos = jnp.atleast_1d(jnp.asarray(-1 if eos_token_id is None else eos_token_id, jnp.int32))
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  return _generate(module, params, input_ids, attention_mask, key, eos, jnp.int32(pad_token_id),
                   jnp.float32(temperature or 1.0), jnp.float32(top_p), max_new_tokens=max_new_tokens,
                   sample=temperature > 0, nucleus=top_p < 1.0)

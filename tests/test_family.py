"""Adapter families as values: the registry's operations over every family, and a user's own family."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmlora_jax as rl
from rmlora_jax.adapters import family as family_lib
from rmlora_jax.adapters import lora
from rmlora_jax.adapters import registry


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"dense": {"kernel": jax.random.normal(k[0], (6, 5))}, "out": {"kernel": jax.random.normal(k[1], (5, 3))}}


SCALED = family_lib.Family(
    name="scaled", factors=frozenset({"a", "b", "s"}), product=lambda ad: ad["s"] * (ad["b"] @ ad["a"]),
    counts=lambda ad: (ad["a"].size + ad["b"].size + 1,) * 2)


def test_a_users_family_merges_through_families_as_numpy_says():
  params, rng = _params(), np.random.default_rng(0)
  ad = {"a": rng.normal(size=(2, 6)).astype(np.float32), "b": rng.normal(size=(5, 2)).astype(np.float32),
        "s": np.float32(0.5)}
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=("dense/kernel",))
  merged = rl.merge(params, {"dense/kernel": ad}, spec, families=(*rl.FAMILIES, SCALED))
  want = np.asarray(params["dense"]["kernel"]) + (2.0 * 0.5 * ad["b"] @ ad["a"]).T
  np.testing.assert_allclose(merged["dense"]["kernel"], want, rtol=1e-5, atol=1e-6)
  assert merged["out"]["kernel"] is params["out"]["kernel"]
  # Without a factored form, attach merges it into a plain kernel: the same numbers.
  attached = rl.attach(params, {"dense/kernel": ad}, spec, families=(*rl.FAMILIES, SCALED))
  np.testing.assert_allclose(attached["dense"]["kernel"], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"'dense/kernel' has factors \['a', 'b', 's'\].*lora \{a, b\}"):
    rl.merge(params, {"dense/kernel": ad}, spec)  # ours alone do not know it


def test_every_family_is_listed_once_with_its_methods():
  names = [f.name for f in registry.FAMILIES]
  assert names == ["lora", "adalora", "sora", "lora2"]
  assert len({f.factors for f in registry.FAMILIES}) == 4
  methods = {m for f in registry.FAMILIES for m in f.methods}
  assert methods | {"full_ft"} == set(registry.METHODS)
  for name, entry in registry.METHODS.items():
    if name != "full_ft":
      assert name in entry.definition.methods and entry.options is entry.definition.options


@pytest.mark.parametrize("init", ["init_lora", "init_adalora", "init_sora"])
def test_registry_and_family_module_agree_on_products(init):
  params = _params()
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=(".*kernel",))
  adapters = getattr(rl, init)(jax.random.key(1), params, spec)
  # Give every factor nonzero values, so the products are not zero.
  adapters = jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), adapters)
  fam = registry.family_of(next(iter(adapters.values())))
  for path, ad in adapters.items():
    ad = {k: np.asarray(v, np.float64) for k, v in ad.items()}
    want = {"lora": lambda: ad["b"] @ ad["a"], "adalora": lambda: ad["p"] @ np.diag(ad["lam"]) @ ad["q"],
            "sora": lambda: ad["b"] @ np.diag(ad["g"]) @ ad["a"]}[fam.name]()
    np.testing.assert_allclose(rl.delta_weights(adapters, spec)[path], spec.scale * want, rtol=1e-5, atol=1e-6)
  if fam is not lora.FAMILY:
    with pytest.raises(ValueError, match="match no known adapter family"):
      lora.merge(params, adapters, spec)  # the LoRA module's merge takes LoRA adapters only


def test_a_fresh_process_needs_no_family_import_first():
  # delta_weights of SoRA adapters from the top-level package alone (no adapters.sora import of one's own).
  code = ("import jax, rmlora_jax as rl\n"
          "from rmlora_jax.adapters import registry\n"
          "p = {'w': {'kernel': jax.numpy.ones((4, 3))}}\n"
          "spec = rl.LoraSpec(rank=2, alpha=2.0, targets=('w/kernel',))\n"
          "ads = {'w/kernel': {'a': jax.numpy.ones((2, 4)), 'b': jax.numpy.ones((3, 2)), 'g': jax.numpy.ones(2)}}\n"
          "print(float(rl.delta_weights(ads, spec)['w/kernel'].sum()), registry.family_of(ads['w/kernel']).name)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
  # dW = (2 / 2) * ones(3, 2) @ diag(ones(2)) @ ones(2, 4): twelve entries of 2.
  assert float(out[0]) == 24.0 and out[1] == "sora"

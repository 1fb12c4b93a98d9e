"""Answer extraction on tricky model outputs, and grading equivalences through math-verify."""

import pytest

from dcd_megatron.eval.answers import (
    extract_answer,
    extract_boxed,
    extract_gsm8k,
    grade,
    normalize_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
        ("$\\boxed{\\{1,2\\}}$", "\\{1,2\\}"),  # escaped braces do not close the box
        ("\\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}"),
        ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}}", "\\sqrt{\\frac{a}{b^{2}}}"),  # deep nesting
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # several boxes: the last
        ("first \\boxed{1}, then \\fbox{7}", "7"),  # \fbox counts as a box
        ("hence $\\boxed 5$.", "5"),  # no braces
        ("\\boxed{5\\text{ cm}}", "5\\text{ cm}"),  # units are kept for the grader
        ("\\boxed{90^\\circ}", "90^\\circ"),
        ("\\boxed{ 12 }", "12"),
        ("no answer at all", None),
        ("", None),
        (None, None),
        ("put it in \\boxed{}", None),  # empty box
        ("\\boxed{3} and then \\boxed{\\frac{1}{", None),  # the last box was cut off
        ("\\boxedsomething{3}", None),  # another command, not a box
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("so 1,000 + 234 = 1,234\n#### 1,234", "1234"),  # thousands separators
        ("The total is $1,234.50.", "1234.5"),  # dollars, decimals, trailing period
        ("The temperature is -3 degrees.", "-3"),  # negative number
        ("He walks 10-3 = 7 km", "7"),  # a minus between numbers is subtraction
        ("It costs 2.00 dollars", "2"),
        ("The answer is .5", "0.5"),
        ("3, 4, and finally 12 cm", "12"),  # list commas are not thousands separators
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


def test_gsm8k_answer_prefers_the_box_then_the_last_number():
    assert extract_answer("I think 5, so \\boxed{1,234} and 9 more words", "gsm8k") == "1234"
    assert extract_answer("I think 5 and then 9", "gsm8k") == "9"
    assert extract_answer("nothing", "gsm8k") is None
    assert extract_answer("\\boxed{7} then 9", "boxed") == "7"
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer("x", "multiple_choice")


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("0.5", "\\frac12"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("x=3", "3"),
        ("3", "x = 3"),
        ("[1,3)", "[1, 3)"),
        ("(-\\infty, 3]", "(-\\infty,3]"),
        ("\\{1,2\\}", "\\{2,1\\}"),
        ("5\\text{ cm}", "5"),
        ("90^\\circ", "90"),
        ("\\$18", "18"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("-3", "-3.0"),
        ("\\text{(B)}", "B"),
    ],
)
def test_grade_accepts_equivalent_answers(pred, ref):
    assert grade(pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("3", "4"),
        ("(1,3)", "[1,3]"),  # open vs closed interval
        ("0.333", "\\frac13"),  # a rounded value is not the fraction
        ("-3", "3"),
        (None, "3"),  # no answer is wrong
        ("", "3"),
        ("   ", "3"),
        ("\\frac{1}{", "\\frac12"),  # garbage never raises
        ("3", None),
    ],
)
def test_grade_rejects_wrong_or_missing_answers(pred, ref):
    assert not grade(pred, ref)


def test_no_answer_extracted_is_graded_wrong():
    assert not grade(extract_boxed("I could not solve it."), "42")


def test_normalize_answer_strips_formatting_only():
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer("\\frac{1}{2}")
    assert normalize_answer("$1,234.50$") == "1234.5"
    assert normalize_answer("5\\text{ cm}") == "5"
    assert normalize_answer("x = 3") == "3"
    assert normalize_answer("\\text{Monday}") == "monday"
    assert normalize_answer("3") != normalize_answer("4")

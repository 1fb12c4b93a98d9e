"""The correctness filter of dcd-generate, on a character tokenizer with known answers: each reason once."""

from collections import Counter

from dcd_megatron.generate.judge import Grader, judge, precheck

EOS, TEACHER_EOS = 1000, 1001  # above every character code used


class CharTokenizer:
    """ids are character codes; id 2000 decodes to '7' too, so it does not survive a re-encode."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join("7" if i == 2000 else chr(i) for i in ids)


def _ids(text, end=EOS):
    return [ord(c) for c in text] + ([end] if end is not None else [])


CASES = [  # (tokens, reference, reason)
    (_ids("so 3+4=7. #### 7"), "7", "kept"),
    (_ids("the answer is 7"), "7.0", "kept"),  # the grader's equivalence, not string equality
    (_ids("so 3+4=7 and", end=None), "7", "truncated"),
    (_ids("so 3+4=7", end=TEACHER_EOS), "7", "no_eos"),
    ([*_ids("so ", end=None), 2000, EOS], "7", "retokenize_mismatch"),
    (_ids("no idea"), "7", "ungradable"),
    (_ids("3+4=8"), "7", "wrong"),
]


def test_each_sample_gets_the_first_reason_it_fails():
    verdicts = judge([c[0] for c in CASES], [c[1] for c in CASES], tokenizer=CharTokenizer(), eos_id=EOS,
                     stop_ids={EOS, TEACHER_EOS}, answer_format="gsm8k", grader=Grader(0))
    assert [v.reason for v in verdicts] == [c[2] for c in CASES]
    assert verdicts[0].response == "so 3+4=7. #### 7" and verdicts[0].predicted == "7"
    assert Counter(v.reason for v in verdicts) == {"kept": 2, "truncated": 1, "no_eos": 1, "retokenize_mismatch": 1,
                                                   "ungradable": 1, "wrong": 1}


def test_grading_in_a_process_pool_gives_the_same_verdicts():
    args = dict(tokenizer=CharTokenizer(), eos_id=EOS, stop_ids={EOS, TEACHER_EOS}, answer_format="gsm8k")
    here = judge([c[0] for c in CASES], [c[1] for c in CASES], grader=Grader(0), **args)
    with Grader(2) as grader:
        pooled = judge([c[0] for c in CASES], [c[1] for c in CASES], grader=grader, **args)
        assert grader._pool is not None  # the pool graded what string equality did not settle
    assert pooled == here


def test_the_response_is_the_text_before_the_end_token():
    assert precheck(_ids("12"), tokenizer=CharTokenizer(), eos_id=EOS, stop_ids={EOS},
                    answer_format="gsm8k") == ("12", "12", None)

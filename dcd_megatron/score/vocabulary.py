"""Is the teacher's vocabulary the student's? Token pieces by id must agree; special-token roles may not.

A base student and an instruct teacher of one family (e.g. Qwen2.5 1.5B and 7B-Instruct) share
every token but name different eos tokens in tokenizer_config.json. Scoring encodes with the
student's tokenizer (its eos included), so only the pieces matter.
"""

from __future__ import annotations

from dcd_megatron.data.tokenizer import Tokenizer, TokenizerError


def check_teacher_vocabulary(student: Tokenizer, teacher: Tokenizer) -> str | None:
    """Raise if the teacher's tokens differ from the student's; return a note when only special roles do."""
    if student.fingerprint == teacher.fingerprint:
        return None
    fix = ("teacher log-probs must be computed under the STUDENT tokenizer: score with a teacher of the "
           "same tokenizer family")
    if student.vocab_size != teacher.vocab_size:
        raise TokenizerError(
            f"the teacher tokenizer ({teacher.path}, vocab {teacher.vocab_size}) differs from the "
            f"student's ({student.path}, vocab {student.vocab_size}); {fix}"
        )
    for i in range(student.vocab_size):
        a, b = student.token_text(i), teacher.token_text(i)
        if a != b:
            raise TokenizerError(
                f"the teacher tokenizer ({teacher.path}) differs from the student's ({student.path}) "
                f"at token id {i}: {b!r} vs {a!r}; {fix}"
            )
    return (
        f"the teacher's special tokens differ (eos/bos/pad ids {teacher.eos_id}/{teacher.bos_id}/{teacher.pad_id}, "
        f"student's {student.eos_id}/{student.bos_id}/{student.pad_id}) but every token is the same; "
        "rows are encoded with the student's"
    )

"""README's config table is generated from the dataclasses and every key is described."""

from pathlib import Path

from dcd_megatron.configs.reference import END, START, reference_markdown, reference_rows, with_reference
from dcd_megatron.configs.train import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_current():
    text = README.read_text()
    assert with_reference(text, reference_markdown(TrainConfig)) == text, (
        "README.md's config table is stale: run `python -m dcd_megatron.configs.reference --write README.md`"
    )


def test_every_key_has_a_default_and_a_description():
    rows = reference_rows(TrainConfig)
    assert len(rows) > 60
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert undocumented == [], f"add a comment to these config fields: {undocumented}"
    assert all(START not in doc and END not in doc for *_, doc in rows)

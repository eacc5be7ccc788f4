"""The one vocabulary: every 7-point value has both phrases, and the parser reads each back."""

import pytest

from models.vocabulary import SEVEN_POINT, SEVEN_POINT_PHRASES, SEVEN_POINT_SCORING, SEVEN_POINT_TEXTBOOK, parse_findings, seven_point_phrase


@pytest.mark.parametrize("table", [SEVEN_POINT_PHRASES, SEVEN_POINT_TEXTBOOK], ids=["agent", "textbook"])
def test_every_value_has_a_phrase_the_parser_reads_back(table):
    assert {c: set(v) for c, v in table.items()} == {c: set(v) for c, v in SEVEN_POINT.items()}
    for criterion, values in SEVEN_POINT.items():
        for value in values:
            assert parse_findings(table[criterion][value]) == {criterion: value}, table[criterion][value]


def test_scoring_and_phrase_lookup_use_the_vocabulary():
    assert all(v in SEVEN_POINT[c] for c, v in SEVEN_POINT_SCORING)
    assert seven_point_phrase("streaks", "irregular").startswith("irregular streaks")
    with pytest.raises(ValueError, match="unknown 7-point"):
        seven_point_phrase("streaks", "wavy")


def test_agent_labels_is_only_an_alias():
    import agent.labels
    import models.vocabulary

    assert agent.labels.SEVEN_POINT is models.vocabulary.SEVEN_POINT

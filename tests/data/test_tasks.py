import pytest

from tunelab.data import load_task
from tunelab.data.tasks import TASKS


@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_task_is_seeded_and_splits_are_disjoint(name):
    a, b = load_task(name), load_task(name)
    assert [e.input for e in a.train[:20]] == [e.input for e in b.train[:20]]
    assert len(a.train) >= 500 and len(a.eval) >= 100
    assert not {e.input for e in a.eval} & {e.input for e in a.train}
    assert all(e.output and e.references[0] == e.output for e in a.train[:50])


def test_at_least_five_tasks_including_classification_with_options():
    assert len(TASKS) >= 5
    sentiment = load_task("sentiment")
    assert sentiment.train[0].options == ("positive", "negative")
    assert {e.output for e in sentiment.train} == {"positive", "negative"}


def test_date_task_answers_are_right():
    ex = load_task("date_format").train[0]
    year, month, day = ex.input.split("-")
    assert ex.output.endswith(f"{int(day)}, {year}")

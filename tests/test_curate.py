import random

from ssb.stages.curate import choose_pair


def test_most_common_wrong_answer_is_chosen():
    answers = ["7", "9", "8", "9", "7", "9"]
    correct = [True, False, False, False, True, False]
    for seed in range(20):
        ci, wi = choose_pair(answers, correct, random.Random(seed))
        assert answers[wi] == "9" and correct[ci]


def test_wrong_answers_are_grouped_by_canonical_key():
    # "1,000" and "1000.0" are the same wrong answer (2 votes) against "999" (1 vote)
    answers = ["12", "1,000", "999", "1000.0"]
    correct = [True, False, False, False]
    for seed in range(10):
        _, wi = choose_pair(answers, correct, random.Random(seed), "gsm8k")
        assert wi in (1, 3)


def test_ties_are_broken_by_the_seed_reproducibly():
    answers = ["4", "5", "6", "4"]
    correct = [True, False, False, True]
    picks = {choose_pair(answers, correct, random.Random(s))[1] for s in range(30)}
    assert picks == {1, 2}  # both tied wrong answers get chosen for some seed
    assert all(choose_pair(answers, correct, random.Random(s)) == choose_pair(answers, correct, random.Random(s))
               for s in range(10))


def test_skip_reasons():
    r = random.Random(0)
    assert choose_pair([None, None], [False, False], r) == "no_answer"
    assert choose_pair(["3", None, "5"], [False, False, False], r) == "no_correct"
    assert choose_pair(["4", None, "4"], [True, False, True], r) == "no_incorrect"  # unanswered is not wrong
    assert choose_pair([], [], r) == "no_answer"

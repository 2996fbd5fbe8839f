"""The response parser on a table of well-formed and malformed distiller outputs."""

import pytest

from lmmixup_hf.distiller.prompts import format_target
from lmmixup_hf.distiller.response_parsing import extract_tags, parse_response, split_output


def wrap(answer: str, think: str = "They overlap.") -> str:
    return format_target(answer, think)


# (task_type, raw response, expected prompt, expected completion)
WELL_FORMED = [
    ("qa", wrap("Q: When was the bridge built?\nA: In the 1890s."), "When was the bridge built?", "In the 1890s."),
    ("qa_mixup", wrap("Q: Who?\nA: Hale,\nan engineer."), "Who?", "Hale,\nan engineer."),
    ("qa", "<THINK>x</THINK><Answer>\nQ: Multi\nline?\nA: Yes.\n</ANSWER>", "Multi\nline?", "Yes."),
    ("qa", "<think>reasoning\n</think>\n<answer>\nQ: No closing tag?\nA: Tolerated.", "No closing tag?", "Tolerated."),
    ("qa", "<answer>Question: Long markers?\nAnswer: Accepted.</answer>", "Long markers?", "Accepted."),
    ("qa", wrap("Q: First?\nA: One.\n\nQ: Second?\nA: Two."), "First?", "One."),  # a list, not a merge: first pair
    (
        "mcq",
        wrap("Q: Which material?\nA) Stone\nB) Iron\nC) Timber\nD) Concrete\nAnswer: B"),
        "Which material?\nA) Stone\nB) Iron\nC) Timber\nD) Concrete",
        "Answer: B",
    ),
    (
        "mcq",
        wrap("Which material?\n(A) Stone\n(B) Iron\nAnswer: (a) Stone"),
        "Which material?\nA) Stone\nB) Iron",
        "Answer: A",
    ),
    ("tfq", wrap("The bridge is made of iron.\nAnswer: True"), "The bridge is made of iron.", "Answer: True"),
    ("tfq", wrap("Q: The bridge is wooden.\nanswer: false."), "The bridge is wooden.", "Answer: False"),
    (
        "cs",
        wrap("C: Infrastructure\nS: The bridge is an 1890s iron bridge."),
        "Infrastructure",
        "The bridge is an 1890s iron bridge.",
    ),
    (
        "para",
        wrap("The bridge is iron. It was built in the 1890s.\nHale designed it."),
        "The bridge is iron.",
        "It was built in the 1890s. Hale designed it.",
    ),
    ("para", wrap("One sentence only"), "", "One sentence only"),
]


@pytest.mark.parametrize("task_type,raw,prompt,completion", WELL_FORMED)
def test_well_formed(task_type, raw, prompt, completion):
    parsed = parse_response(raw, task_type)
    assert parsed.ok, parsed.error
    assert (parsed.prompt, parsed.completion) == (prompt, completion)
    assert parsed.output and parsed.output.lower() in raw.lower()


# (task_type, raw response, substring of the reason)
MALFORMED = [
    ("qa", "", "empty response"),
    ("qa", "Q: no tags at all\nA: an answer", "no <answer> tag"),
    ("qa", "<think>only thinking</think>", "no <answer> tag"),
    ("qa", "<think>x</think><answer>\n</answer>", "empty <answer>"),
    ("qa", wrap("Just a sentence."), "no 'Q:' line"),
    ("qa", wrap("Q: a question without an answer line"), "no 'A:' line"),
    ("qa", wrap("Q: \nA: an answer"), "empty question"),
    ("mcq", wrap("Q: Which?\nA) x\nB) y"), "no 'Answer: <letter>' line"),
    ("mcq", wrap("Q: Which?\nA) x\nB) y\nAnswer: E"), "not one of the options"),
    ("mcq", wrap("Q: Which?\nA) x\nAnswer: A"), "at least 2 options"),
    ("mcq", wrap("Q: Which?\nA) x\nC) y\nAnswer: A"), "not labelled"),
    ("mcq", wrap("Q: Which?\nA) x\nB) y\nAnswer: both"), "not an option letter"),
    ("tfq", wrap("The bridge is iron."), "no 'Answer: True|False' line"),
    ("tfq", wrap("The bridge is iron.\nAnswer: maybe"), "neither True nor False"),
    ("tfq", wrap("Answer: True"), "empty statement"),
    ("cs", wrap("S: a statement"), "no 'C:'"),
    ("cs", wrap("C: Infrastructure"), "no 'S:'"),
    ("para", wrap("Q: a pair\nA: not a paragraph"), "got a Q/A pair"),
    ("essay", wrap("Some text."), "unknown task type"),
]


@pytest.mark.parametrize("task_type,raw,reason", MALFORMED)
def test_malformed_is_flagged_never_invented(task_type, raw, reason):
    parsed = parse_response(raw, task_type)
    assert not parsed.ok
    assert reason in parsed.error
    assert parsed.prompt is None and parsed.completion is None
    assert parsed.as_dict()["parse_ok"] is False and parsed.as_dict()["parse_error"] == parsed.error


def test_extract_tags_cases():
    assert extract_tags("<think> a </think>\n\n<answer> b </answer> trailing") == ("a", "b")
    assert extract_tags("<think>unclosed <answer>b") == ("unclosed", "b")
    assert extract_tags("no tags") == (None, None)
    assert extract_tags("<answer>first</answer><answer>second</answer>") == (None, "first")


def test_target_format_round_trips_for_every_task():
    samples = {
        "qa": "Q: q?\nA: a.",
        "mcq": "Q: q?\nA) a\nB) b\nAnswer: B",
        "tfq": "A statement.\nAnswer: False",
        "cs": "C: cat\nS: A statement.",
        "para": "First. Second.",
    }
    for task, output in samples.items():
        parsed = parse_response(format_target(output, "why"), task)
        assert parsed.ok, (task, parsed.error)
        assert parsed.think == "why" and parsed.output == output
        assert split_output(output, task) == (parsed.prompt, parsed.completion)


def test_the_self_contained_parser_knows_the_contract_task_types():
    """response_parsing ships alone with a saved pipeline, so it keeps its own copy of the list."""
    from lmmixup_hf.data.schema import TASK_TYPES
    from lmmixup_hf.distiller import response_parsing

    assert response_parsing.TASK_TYPES == TASK_TYPES

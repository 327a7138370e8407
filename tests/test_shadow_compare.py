"""Prediction extraction and comparison, tested directly (no sockets)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.jsonpath import MISSING
from gateway.shadow.compare import Comparator, fold_sse, label_text, similarity
from gateway.shadow.config import parse_compare


def comparator(**compare: Any) -> Comparator:
    return Comparator(parse_compare(compare, "compare"))


def kserve(labels: list[Any], probs: list[float]) -> bytes:
    return orjson.dumps({"id": "x", "outputs": [
        {"name": "label", "datatype": "BYTES", "data": labels},
        {"name": "probability", "datatype": "FP32", "data": probs}]})


def sse(*tokens: str) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in tokens]
    lines = [b"data: " + orjson.dumps(e) for e in events]
    lines += [b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
              b"data: [DONE]"]
    return b"\n\n".join(lines) + b"\n\n"


def test_presets_extract() -> None:
    body = kserve(["setosa", "virginica"], [0.9, 0.8])
    assert comparator(preset="kserve_v2").extract(body) == (
        [["setosa", "virginica"], [0.9, 0.8]], "kserve_v2")
    tf = orjson.dumps({"predictions": [[1.0, 2.0]]})
    assert comparator(preset="tf_serving").extract(tf)[0] == [[1.0, 2.0]]
    chat = orjson.dumps({"choices": [{"message": {"content": "Hi there"}}]})
    assert comparator(preset="openai_chat").extract(chat)[0] == "Hi there"
    assert comparator(preset="openai_chat").extract(sse("Hi", " there"),
                                                    "text/event-stream")[0] == "Hi there"
    # A body starting with `data:` is a stream even without the content type.
    assert comparator(preset="openai_chat").extract(sse("a", "b"))[0] == "ab"
    assert comparator(path="outputs[0].data").extract(body)[0] == ["setosa", "virginica"]


def test_auto_preset_detects_the_protocol() -> None:
    auto = comparator()
    assert auto.extract(kserve(["a"], [0.5])) == ([["a"], [0.5]], "kserve_v2")
    assert auto.extract(orjson.dumps({"predictions": [1.5]})) == ([1.5], "tf_serving")
    chat = orjson.dumps({"choices": [{"message": {"content": "yo"}}]})
    assert auto.extract(chat) == ("yo", "openai_chat")
    assert auto.extract(sse("y", "o")) == ("yo", "openai_chat")
    assert auto.extract(b'{"score": 3}') == ({"score": 3}, None)
    assert auto.text_strings("openai_chat") and not auto.text_strings("kserve_v2")


@pytest.mark.parametrize("body", [None, b"", b"not json", b'{"outputs": 3}', b"data: [DONE]"])
def test_unparsable_bodies_are_missing(body: bytes | None) -> None:
    c = comparator(preset="kserve_v2") if body != b"data: [DONE]" else comparator(
        preset="openai_chat")
    assert c.extract(body)[0] is MISSING


def test_fold_sse_skips_noise() -> None:
    body = b": comment\n\ndata: not json\n\n" + sse("x")
    assert fold_sse(body) == {"choices": [{"message": {"content": "x"}}]}
    assert fold_sse(b"data: [DONE]\n\n") is MISSING


def test_labels_compare_exactly_with_confusion_per_element() -> None:
    c = comparator(preset="kserve_v2")
    result = c.compare([["setosa", "virginica", "setosa"]], [["setosa", "versicolor", "setosa"]])
    assert (result.labels, result.labels_agree) == (3, 2)
    assert result.confusion == [("setosa", "setosa"), ("virginica", "versicolor"),
                                ("setosa", "setosa")]
    assert not result.agree
    assert (result.elements, result.elements_agree) == (3, 2)


def test_label_types() -> None:
    c = comparator()
    result = c.compare([True, 1, None, 2], [1, 1, "x", 2])
    # bool True is not the integer 1; null against a string is a label pair too.
    assert (result.labels, result.labels_agree) == (4, 2)
    assert result.confusion == [("true", "1"), ("1", "1"), ("null", "x"), ("2", "2")]
    assert label_text("x" * 100).endswith("…") and len(label_text("x" * 100)) == 64


def test_numbers_within_tolerance() -> None:
    c = comparator(numbers={"abs_tol": 0.01, "rel_tol": 0.0})
    result = c.compare([1.0, 2.0, 3.0], [1.005, 2.02, 3])
    assert (result.numbers, result.numbers_agree) == (3, 2)
    assert result.delta_max == pytest.approx(0.02)
    assert result.delta_sum == pytest.approx(0.025)
    rel = comparator(numbers={"abs_tol": 0, "rel_tol": 0.01})
    assert rel.compare([1000.0], [1009.0]).agree
    assert not rel.compare([1000.0], [1011.0]).agree
    assert not rel.compare([0.0], [1e-9]).agree


def test_agree_on() -> None:
    pred_live = [["setosa", "virginica"], [0.9, 0.8]]
    pred_shadow = [["setosa", "virginica"], [0.91, 0.7]]
    # auto (default): labels decide when there are labels; numbers are still measured.
    auto = comparator(preset="kserve_v2").compare(pred_live, pred_shadow)
    assert auto.agree and (auto.elements, auto.elements_agree) == (2, 2)
    assert (auto.numbers, auto.numbers_agree) == (2, 0)
    assert auto.delta_max == pytest.approx(0.1)
    every = comparator(preset="kserve_v2", agree_on="all").compare(pred_live, pred_shadow)
    assert not every.agree and (every.elements, every.elements_agree) == (4, 2)
    labels = comparator(preset="kserve_v2", agree_on="labels").compare([[1.0]], [[2.0]])
    assert labels.agree and labels.elements == 0
    # Without labels, auto judges by the numbers.
    assert not comparator().compare([1.0], [2.0]).agree


def test_structure_mismatches_disagree() -> None:
    c = comparator()
    result = c.compare([["a", "b"], [0.5, 0.5]], [None, None])
    assert result.mismatched == 4 and not result.agree  # every live element lost
    result = c.compare(["a", "b", "c"], ["a"])
    assert (result.labels_agree, result.mismatched) == (1, 2)
    result = c.compare({"x": 1, "y": 2}, {"x": 1, "z": 3})
    assert (result.labels_agree, result.mismatched) == (1, 2)
    assert c.compare([], []).agree
    assert not c.compare(1.0, "1.0").agree


def test_text_exact_and_similarity() -> None:
    exact = comparator(preset="openai_chat")
    assert exact.compare("Hello  World", "Hello  World", True).agree
    assert not exact.compare("Hello world", "hello world", True).agree
    similar = comparator(preset="openai_chat", text={"mode": "similarity",
                                                     "min_similarity": 0.9})
    assert similar.slow
    result = similar.compare("Hello   WORLD", "hello world", True)
    assert result.agree and result.similarity_sum == 1.0
    far = similar.compare("You said: hi", "You wrote: hi!", True)
    assert not far.agree and 0 < far.similarity_sum < 0.9
    assert far.confusion == []  # text is not a label: no confusion counts


def test_similarity_normalizes_and_bounds_cost() -> None:
    assert similarity("A  b\tC", "a b c") == 1.0
    assert similarity("abc", "xyz") == 0.0
    assert 0.5 < similarity("the cat sat on the mat", "the cat sat on a mat") < 1.0
    long_a = " ".join(f"w{i}" for i in range(3000))
    long_b = " ".join(f"w{i}" for i in range(3000) if i != 1500)
    # Over MAX_TEXT_CHARS it compares words: one dropped word out of 3000.
    assert similarity(long_a, long_b) == pytest.approx(2 * 2999 / 5999)

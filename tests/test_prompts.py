"""Prompt text for the text encoders (opensora_lib.prompts)."""

from __future__ import annotations

import pytest
from helpers_tables import run_table

from opensora_lib import prompts
from opensora_lib.fixtures.prompt_tables import _is_prompts_table, run_prompts_table

# ----------------------------------------------------------------------------- golden table


def _run_table() -> list:
    return run_table("prompts.json", _is_prompts_table, run_prompts_table)


def test_prompts_table_matches_official(capsys):
    comparisons = _run_table()
    failed = [f"{c.name}: {c.detail}" for c in comparisons if not c.passed]
    assert not failed, failed
    names = {c.name for c in comparisons}
    for version in ("1.2", "1.3", "2.0"):
        assert f"v{version}/prompt[00]" in names
        # the empty prompt is a documented deviation, checked under its own name
        assert f"v{version}/prompt[01]/empty_prompt_raises" in names
    assert len(comparisons) >= 99
    notes = capsys.readouterr().out
    # the official --prompt CSV mangling is excluded out loud, with its counts
    assert "cli_prompt_via_csv: 99 entries NOT compared" in notes
    assert "6 were mangled" in notes and "3 crashed" in notes


def test_prompts_table_runner_detects_a_wrong_cleaner(monkeypatch):
    monkeypatch.setattr(prompts, "clean_caption", lambda text: str(text).strip().lower())
    failed = {c.name for c in _run_table() if not c.passed}
    assert "v1.3/prompt[03]" in failed  # the URL prompt
    assert "v1.2/prompt[04]" in failed  # the HTML prompt
    assert not any(name.startswith("v2.0/") for name in failed)  # 2.0 does not clean


def test_prompts_table_runner_detects_a_wrong_suffix(monkeypatch):
    real = prompts.prompt_text_v2
    monkeypatch.setattr(prompts, "prompt_text_v2", lambda p, fps=24, motion_score=4: real(p, fps, motion_score) + " ")
    failed = {c.name for c in _run_table() if not c.passed}
    assert "v2.0/prompt[00]" in failed


# ----------------------------------------------------------------------------- caption cleaning


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Check https://example.com/video.mp4 and www.test.org/page for details", "check and for details"),
        ("<p>Bold <b>text</b> &amp; entities</p>", "bold text entities"),
        ("“Smart” ‘single’ «g» — em – en", '"smart" \'single\' "g" - em - en'),
        ("一只猫在弹钢琴 a cat playing piano", "a cat playing piano"),
        ("日本語のテキスト", "のテキスト"),  # kana are not in the removed CJK ranges
        ("this_is_my_cute_cat-with-dashes", "this is my cute cat with dashes"),
        ("only-two_joiners", "only-two_joiners"),
        ("Shot in 1920x1080 on a jc6640vc camera, model 6640vc231", "shot in on a camera, model"),
        ("@user123 tweeted #12 and 1234567", "tweeted and"),
        ("a%20url+encoded", "a url encoded"),
        ("Line one\\n two", "line one two"),
        ("'wrapped in quotes'", "wrapped in quotes"),
        ("I'm fine -- ok? <person> walks", "i'm fine - ok? person walks"),
    ],
)
def test_text_preprocessing(raw, clean):
    assert prompts.text_preprocessing(raw) == clean


def test_cleaning_twice_matters():
    # the first pass turns fullwidth symbols into ASCII only at its end; the second pass removes them
    assert prompts.clean_caption("Ｆｕｌｌ｜ｗｉｄｔｈ") == "full|width"
    assert prompts.text_preprocessing("Ｆｕｌｌ｜ｗｉｄｔｈ") == "full width"
    assert prompts.text_preprocessing("&lt;b&gt;bold&lt;/b&gt; text") == "bold< b> text"


# ----------------------------------------------------------------------------- 1.x


def test_v12_numeric_scores():
    text = prompts.prompt_text_v1("A cat", "1.2", aes=5.25, flow=3.75, camera_motion="pan right")
    assert text == "a cat aesthetic score: 5.2. motion score: 3.8. camera motion: pan right."
    assert prompts.prompt_text_v1("A cat", "1.2") == "a cat"
    # a prompt that already carries the sentence does not get it twice
    assert prompts.prompt_text_v1("x aesthetic score: 6.0.", "1.2", aes=6.5) == "x aesthetic score: 6.0."


@pytest.mark.parametrize(
    ("aes", "word"),
    [
        (3.99, "terrible"),
        (4, "very poor"),
        (4.5, "poor"),
        (5.49, "fair"),
        (6, "very good"),
        (6.5, "excellent"),
        ("good", "good"),
    ],
)
def test_v13_aesthetic_words(aes, word):
    assert prompts.prompt_text_v1("A cat", "1.3", aes=aes) == f"a cat the aesthetic score is {word}."


@pytest.mark.parametrize(
    ("flow", "word"), [(0.49, "very low"), (0.5, "low"), (4.99, "fair"), (10, "very high"), (20, "extremely high")]
)
def test_v13_motion_words(flow, word):
    assert prompts.prompt_text_v1("A cat", "1.3", flow=flow) == f"a cat the motion strength is {word}."


def test_score_errors():
    with pytest.raises(ValueError, match="aes must be a finite number or one of terrible"):
        prompts.prompt_text_v1("A cat", "1.3", aes="superb")
    with pytest.raises(ValueError, match="aes must be a finite number"):
        prompts.prompt_text_v1("A cat", "1.2", aes="good")
    with pytest.raises(ValueError, match="finite"):
        prompts.prompt_text_v1("A cat", "1.3", flow=float("nan"))
    with pytest.raises(ValueError, match="camera_motion must be None, 'none' or one of pan right"):
        prompts.prompt_text_v1("A cat", "1.3", camera_motion="dolly")
    assert prompts.prompt_text_v1("A cat", "1.3", camera_motion="none") == "a cat"
    with pytest.raises(ValueError, match="'1.2' or '1.3'"):
        prompts.prompt_text_v1("A cat", "2.0")


def test_loops():
    prompt = "|0|a sunny beach|1|a rainy beach|2|a snowy beach"
    assert prompts.prompt_loops_v1(prompt, "1.3", loops=4) == [
        "a sunny beach",
        "a rainy beach",
        "a snowy beach",
        "a snowy beach",
    ]
    assert prompts.prompt_text_v1(prompt, "1.3", aes=7, loop=1) == "a rainy beach the aesthetic score is excellent."
    assert prompts.merged_prompt_v1(prompt, "1.2") == prompt
    # segments cover loops from their marker on; unordered markers follow the official expansion
    assert prompts.prompt_loops_v1("|0| a |2| b ", "1.3", loops=3) == ["a", "a", "b"]
    assert prompts.prompt_loops_v1("|0|a|5|b|2|c", "1.3", loops=4) == ["a", "a", "a", "a"]
    # a prompt that does not start with |0| is plain text
    assert prompts.prompt_text_v1("|1|a|2|b", "1.3") == "1 a 2 b"


@pytest.mark.parametrize(("prompt", "message"), [("|0|a|x|b", "not an integer"), ("|0|a|1", "alternate")])
def test_loop_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompts.prompt_text_v1(prompt, "1.3")


def test_loop_and_loop_count_validation():
    with pytest.raises(ValueError, match="loop must be an integer >= 0"):
        prompts.prompt_text_v1("a cat", "1.3", loop=-1)
    with pytest.raises(ValueError, match="loops must be an integer >= 1"):
        prompts.prompt_loops_v1("a cat", "1.3", loops=0)


def test_json_suffix():
    text, extra = prompts.split_prompt_json('a dog running{"reference_path": "ref.png", "mask_strategy": "0"}')
    assert text == "a dog running" and extra == {"reference_path": "ref.png", "mask_strategy": "0"}
    assert prompts.prompt_text_v1('a dog running{"reference_path": "ref.png"}', "1.2") == "a dog running"
    assert prompts.split_prompt_json("no json") == ("no json", None)
    with pytest.raises(ValueError, match="JSON object"):
        prompts.prompt_text_v1("A prompt with {curly} braces", "1.3")
    with pytest.raises(ValueError, match="unknown key"):
        prompts.split_prompt_json('a{"seed": 1}')
    with pytest.raises(ValueError, match="at most one JSON object"):
        prompts.split_prompt_json('a{"mask_strategy": "0"}{"reference_path": "x"}')


@pytest.mark.parametrize("prompt", ["", "   ", "一只猫", "https://example.com", "|0|", "https://example.com/fox.mp4"])
@pytest.mark.parametrize("aes", [6.5, None])
def test_empty_v1_prompt_raises(prompt, aes):
    with pytest.raises(ValueError, match="empty after caption cleaning"):
        prompts.prompt_text_v1(prompt, "1.3", aes=aes)


def test_a_url_to_a_file_cleans_to_a_bare_full_stop_which_counts_as_empty():
    assert prompts.text_preprocessing("https://example.com/fox.mp4") == "."  # what the official cleaner leaves
    with pytest.raises(ValueError, match="negative prompt is empty"):
        prompts.negative_prompt_text_v1("https://example.com/fox.mp4")
    assert prompts.prompt_text_v1("42", "1.3") == "42"  # a digit is content


def test_unused_prompt_parts_name_the_json_object_and_the_other_loop_segments():
    assert prompts.unused_prompt_parts_v1("a fox in snow") == []
    (json_part,) = prompts.unused_prompt_parts_v1('a fox{"reference_path": "fox.png", "mask_strategy": "0"}')
    assert "reference_path, mask_strategy" in json_part and "Encode Reference" in json_part
    assert prompts.unused_prompt_parts_v1("|0| a fox |1| a cat |4| a dog") == []  # the Sampler's loops use them
    # repeated markers: official loop 0 takes the later segment, so the earlier one is never used
    (repeated,) = prompts.unused_prompt_parts_v1("|0| a fox |0| a cat")
    assert "|0| 'a fox': no loop uses them" in repeated
    assert prompts.prompt_text_v1("|0| a fox |0| a cat", "1.3") == "a cat"
    (lower,) = prompts.unused_prompt_parts_v1("|0| a fox |3| a cat |1| a dog |2| a cow")  # |3| owns no loop
    assert "|3| 'a cat'" in lower and "'a dog'" not in lower


def test_loop_count_is_where_the_text_stops_changing():
    for prompt, count in [("a fox", 1), ("|0| a fox |2| a cat", 3), ("|0| a |3| b |1| c", 4), ("|0| a |0| b", 1)]:
        assert prompts.loop_count_v1(prompt) == count, prompt
        texts = prompts.prompt_loops_v1(prompt, "1.3", loops=count + 3)
        assert texts[count - 1 :] == [texts[count - 1]] * 4, (prompt, texts)  # no change after count - 1
        if count > 1:
            assert texts[count - 2] != texts[count - 1], (prompt, texts)  # and a change at count - 1
    # CJK ideographs are cleaned away, as officially: said, since the rest of the prompt still encodes
    mixed = "一只猫在雪地里奔跑 a cat running in snow"
    assert prompts.prompt_text_v1(mixed, "1.3") == "a cat running in snow"
    (cjk,) = prompts.unused_prompt_parts_v1(mixed)
    assert "(一只猫在雪地里奔跑)" in cjk and "removes them" in cjk
    assert "(模糊, 低质量)" in prompts.dropped_cjk("模糊, 低质量 blurry")  # runs joined as they stood apart
    assert prompts.negative_prompt_text_v1("模糊, 低质量 blurry") == "blurry"
    assert prompts.unused_prompt_parts_v1("ねこ a cat") == []  # kana stay in the text, as officially


def test_empty_loop_segment_only_matters_when_used():
    assert prompts.prompt_text_v1("|0|a cat|5|", "1.3", loop=0) == "a cat"
    with pytest.raises(ValueError, match="loop 5 uses segment 1"):
        prompts.prompt_text_v1("|0|a cat|5|", "1.3", loop=5)


def test_negative_prompt():
    assert prompts.negative_prompt_text_v1("Blurry, LOW quality") == "blurry, low quality"
    with pytest.raises(ValueError, match="null caption"):
        prompts.negative_prompt_text_v1("   ")


# ----------------------------------------------------------------------------- 2.0


def test_v2_suffixes():
    assert prompts.prompt_text_v2("raining, sea") == "raining, sea. 24 FPS. 4 motion score."
    assert (
        prompts.prompt_text_v2("raining, sea.  ", fps=16, motion_score="7") == "raining, sea. 16 FPS. 7 motion score."
    )
    assert prompts.prompt_text_v2("a video at 30 FPS.") == "a video at 30 FPS. 4 motion score."  # fps already there
    assert prompts.prompt_text_v2("a cat", motion_score=None) == "a cat. 24 FPS."
    assert prompts.prompt_text_t2i("A cat ") == "A cat "  # the T2I first frame gets the raw prompt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "  "}, "empty"),
        ({"prompt": "a", "fps": 0}, "fps must be an integer >= 1"),
        ({"prompt": "a", "fps": 24.0}, "fps must be an integer"),
        ({"prompt": "a", "motion_score": "dynamic"}, "GPT"),
        ({"prompt": "a", "motion_score": "high"}, "non-negative number"),
        ({"prompt": "a", "motion_score": -1}, "non-negative number"),
    ],
)
def test_v2_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prompts.prompt_text_v2(**kwargs)


def test_non_string_prompt():
    with pytest.raises(ValueError, match="must be a string"):
        prompts.prompt_text_v2(None)
    with pytest.raises(ValueError, match="must be a string"):
        prompts.prompt_text_v1(3, "1.3")
    with pytest.raises(ValueError, match="empty"):
        prompts.prompt_text_t2i("")


def test_fps_of_v2_reads_the_rate_prompt_text_v2_writes():
    assert prompts.fps_of_v2(prompts.prompt_text_v2("a fox in snow", fps=12)) == 12
    assert prompts.fps_of_v2("a fox in snow.") is None and prompts.fps_of_v2(None) is None

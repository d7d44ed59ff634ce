"""Prompt text exactly as the official Open-Sora scripts feed it to the text encoders.

1.x (scripts/inference.py at v1.2.0 / v1.3): split off a trailing JSON object, split "|k|" loop
segments, append the score text to each segment (1.2 numbers, 1.3 words), run the DeepFloyd/PixArt
caption cleaner twice on each segment, then pick the segment for the requested loop.
2.0 (main): force a final ".", add " {fps} FPS." and " {motion_score} motion score."; the T2I first
frame gets the raw prompt. Deviation: an empty prompt raises ValueError here (the official code encodes
"" or the bare suffix text).
"""

from __future__ import annotations

import html
import json
import math
import re
import urllib.parse
import warnings
from typing import Any

AESTHETIC_WORDS = ("terrible", "very poor", "poor", "fair", "good", "very good", "excellent")
MOTION_WORDS = ("very low", "low", "fair", "high", "very high", "extremely high")
CAMERA_MOTIONS = ("pan right", "pan left", "tilt up", "tilt down", "zoom in", "zoom out", "static")
# Upper bounds of each word's score range (official transform_aes / transform_motion, v1.3).
_AESTHETIC_LIMITS = (4.0, 4.5, 5.0, 5.5, 6.0, 6.5)
_MOTION_LIMITS = (0.5, 2.0, 5.0, 10.0, 20.0)
PROMPT_JSON_KEYS = ("reference_path", "mask_strategy")

# ---------------------------------------------------------------------------------------------
# Caption cleaning: the rules of the DeepFloyd IF / PixArt clean_caption used by Open-Sora 1.x
# ---------------------------------------------------------------------------------------------

_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
# The official code runs the URL rule twice, once with "https?:" and once with "www:" as the scheme
# alternative (the "www:" spelling is the official one; it only matches a literal "www:").
_URL_RULES = [
    re.compile(rf"\b((?:{scheme}(?:/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]{_TLDS}[\w/-]*\b/?(?!@)))")
    for scheme in ("https?:", "www:")
]
_HANDLE = re.compile(r"@[\w\d]+\b")
# CJK strokes .. CJK unified ideographs (U+31C0..U+9FFF, contiguous); kana and hangul are kept.
_CJK = re.compile(r"[\u31c0-\u9fff]+")
_DASHES = re.compile(
    "[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d]+"
)
_DOUBLE_QUOTES = re.compile("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]")
_SINGLE_QUOTES = re.compile("[\u2018\u2019]")
# Symbols replaced by a space: # (R) bullet (C) TM & @ middle-dot ordinal 1/2 3/4 inverted-?! section ~
# and the brackets, pipe, backslash, slash and asterisk.
_BAD_PUNCT = re.compile("[#\u00ae\u2022\u00a9\u2122&@\u00b7\u00ba\u00bd\u00be\u00bf\u00a1\u00a7~)(\\]\\[}{|\\\\/*]+")
_FILE_TYPES = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"

# (pattern, replacement) applied in order before the ftfy/html pass.
_RULES_BEFORE_FIX: list[tuple[re.Pattern, str]] = [
    (_DASHES, "-"),
    (_DOUBLE_QUOTES, '"'),
    (_SINGLE_QUOTES, "'"),
    (re.compile(r"&quot;?"), ""),
    (re.compile(r"&amp"), ""),
    (re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"), " "),  # IP addresses
    (re.compile(r"\d:\d\d\s+$"), ""),  # trailing article ids
    (re.compile(r"\\n"), " "),  # a literal backslash-n
    (re.compile(r"#\d{1,3}\b"), ""),
    (re.compile(r"#\d{5,}\b"), ""),
    (re.compile(r"\b\d{6,}\b"), ""),
    (re.compile(rf"\S+\.{_FILE_TYPES}"), ""),  # file names
    (re.compile(r"[\"']{2,}"), '"'),
    (re.compile(r"\.{2,}"), " "),
    (_BAD_PUNCT, " "),
    (re.compile(r"\s+\.\s+"), " "),
]
_JOINERS = re.compile(r"[-_]")

# Applied in order after the ftfy/html pass.
_RULES_AFTER_FIX: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\b[a-zA-Z]{1,3}\d{3,15}\b"), ""),  # jc6640
    (re.compile(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"), ""),  # jc6640vc
    (re.compile(r"\b\d+[a-zA-Z]+\d+\b"), ""),  # 6640vc231
    (re.compile(r"(worldwide\s+)?(free\s+)?shipping"), ""),
    (re.compile(r"(free\s)?download(\sfree)?"), ""),
    (re.compile(r"\bclick\b\s(?:for|on)\s\w+"), ""),
    (re.compile(rf"\b{_FILE_TYPES}(\simage[s]?)?"), ""),
    (re.compile(r"\bpage\s+\d+\b"), ""),
    (re.compile(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"), " "),  # j2d1a2a...
    (re.compile("\\b\\d+\\.?\\d*[x\u0445\u00d7]\\d+\\.?\\d*\\b"), ""),  # 1920x1080 (latin x, cyrillic x, times)
    (re.compile(r"\b\s+:\s+"), ": "),
    (re.compile(r"(\D[,./])\b"), r"\1 "),
    (re.compile(r"\s+"), " "),
    # Official quirk: the text is not stripped here, so the anchored rules below see edge spaces.
    (re.compile(r"^[\"']([\w\W]+)[\"']$"), r"\1"),
    (re.compile(r"^['_,\-:;]"), ""),
    (re.compile(r"['_,\-:+]$"), ""),
    (re.compile(r"^\.\S+$"), ""),
]


def _fix_text(text: str) -> str:
    """ftfy repair, HTML entities decoded twice, stripped (the official basic_clean)."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _html_text(text: str) -> str:
    """The text content of `text` parsed as HTML by BeautifulSoup's html.parser."""
    from bs4 import BeautifulSoup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bs4 warns when a caption looks like a URL or a file name
        return BeautifulSoup(text, features="html.parser").text


def clean_caption(caption: str) -> str:
    """One pass of the 1.x caption cleaner (lower-case; drops URLs, HTML, @handles, CJK ideographs, ...)."""
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = text.replace("<person>", "person")
    for rule in _URL_RULES:
        text = rule.sub("", text)
    text = _html_text(text)
    text = _HANDLE.sub("", text)
    text = _CJK.sub("", text)
    for pattern, replacement in _RULES_BEFORE_FIX:
        text = pattern.sub(replacement, text)
    # this-is-my-cute-cat / this_is_my_cute_cat: more than three joiners become spaces
    if len(_JOINERS.findall(text)) > 3:
        text = _JOINERS.sub(" ", text)
    text = _fix_text(text)
    for pattern, replacement in _RULES_AFTER_FIX:
        text = pattern.sub(replacement, text)
    return text.strip()


def text_preprocessing(text: str) -> str:
    """The official 1.x text_preprocessing: clean_caption applied twice (as in training)."""
    return clean_caption(clean_caption(text))


# ---------------------------------------------------------------------------------------------
# 1.x prompt structure
# ---------------------------------------------------------------------------------------------


def split_prompt_json(prompt: str) -> tuple[str, dict | None]:
    """Split a trailing JSON object ('a dog{"reference_path": "x.png"}') from the prompt text.

    As the official extract_json_from_prompts: the text before the first "{" is the prompt, the rest
    must be one JSON object with only the keys reference_path / mask_strategy.
    """
    _check_str(prompt)
    start = prompt.find("{")
    if start < 0:
        return prompt, None
    if prompt.count("{") > 1:
        raise ValueError(
            f"the prompt may hold at most one JSON object and no other '{{', found {prompt.count('{')} in {prompt!r}"
        )
    try:
        extra = json.loads(prompt[start:])
    except json.JSONDecodeError as e:
        raise ValueError(
            f'text from \'{{\' on must be a JSON object such as {{"reference_path": "ref.png"}} (1.x prompts use '
            f"'{{' for it): {e.msg} in {prompt[start:]!r}"
        ) from None
    unknown = [key for key in extra if key not in PROMPT_JSON_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the prompt JSON; allowed: {', '.join(PROMPT_JSON_KEYS)}")
    return prompt[:start], extra


def split_loop_segments(text: str) -> list[tuple[int, str]] | None:
    """Parse '|0| a |2| b' into [(0, 'a'), (2, 'b')]; None when the text does not start with '|0|'."""
    if not text.startswith("|0|"):
        return None
    parts = text.split("|")[1:]
    if len(parts) % 2:
        raise ValueError(f"loop prompt {text!r} must alternate '|k|' markers and text ('|0| a |1| b')")
    segments = []
    for marker, segment in zip(parts[0::2], parts[1::2]):
        try:
            start = int(marker)
        except ValueError:
            raise ValueError(f"loop marker |{marker}| in {text!r} is not an integer") from None
        segments.append((start, segment.strip()))
    return segments


def _segment_spans(starts: list[int]) -> list[int]:
    """How many consecutive loops each segment but the last owns, in order (official extract_prompts_loop: segment i
    covers starts[i] .. starts[i + 1] - 1, nothing when the next marker is not higher); the last owns the rest."""
    return [max(end - start, 0) for start, end in zip(starts, starts[1:])]


def _loop_segment_index(starts: list[int], loop: int) -> int:
    """Which segment loop `loop` uses (official extract_prompts_loop, including unordered markers)."""
    for index, span in enumerate(_segment_spans(starts)):
        if loop < span:
            return index
        loop -= span
    return len(starts) - 1


def _score_word(value: Any, words: tuple[str, ...], limits: tuple[float, ...], what: str) -> str:
    if isinstance(value, str) and value in words:
        return value
    number = _as_number(value, what, words)
    for word, limit in zip(words, limits):
        if number < limit:
            return word
    return words[-1]


def _as_number(value: Any, what: str, words: tuple[str, ...] = ()) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        choices = f" or one of {', '.join(words)}" if words else ""
        raise ValueError(f"{what} must be a finite number{choices}, got {value!r}")
    return number


def _check_camera(camera_motion: str | None) -> str | None:
    if camera_motion is None or camera_motion == "none":
        return None
    if camera_motion not in CAMERA_MOTIONS:
        raise ValueError(
            f"camera_motion must be None, 'none' or one of {', '.join(CAMERA_MOTIONS)}; got {camera_motion!r}"
        )
    return camera_motion


def score_text_v1(segment: str, version: str, aes=None, flow=None, camera_motion=None) -> str:
    """`segment` with the score sentences appended (skipped when the text already carries them)."""
    _check_v1(version)
    camera_motion = _check_camera(camera_motion)
    text = segment
    if version == "1.2":
        if aes is not None and "aesthetic score:" not in segment:
            text += f" aesthetic score: {_as_number(aes, 'aes'):.1f}."
        if flow is not None and "motion score:" not in segment:
            text += f" motion score: {_as_number(flow, 'flow'):.1f}."
    else:
        if aes is not None and "aesthetic score is" not in segment:
            text += f" The aesthetic score is {_score_word(aes, AESTHETIC_WORDS, _AESTHETIC_LIMITS, 'aes')}."
        if flow is not None and "motion strength is" not in segment:
            text += f" The motion strength is {_score_word(flow, MOTION_WORDS, _MOTION_LIMITS, 'flow')}."
    if camera_motion is not None and "camera motion:" not in segment:
        text += f" camera motion: {camera_motion}."
    return text


def _check_v1(version: str) -> None:
    if version not in ("1.2", "1.3"):
        raise ValueError(f"1.x prompt text needs version '1.2' or '1.3', got {version!r} (use prompt_text_v2 for 2.0)")


def _check_str(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a string, got {type(prompt).__name__}")


def _segments_v1(
    prompt: str, version: str, aes, flow, camera_motion
) -> tuple[list[tuple[int | None, str, bool]], dict | None]:
    """[(loop start or None, final text, content was empty)], plus the split-off JSON object."""
    _check_v1(version)
    text, extra = split_prompt_json(prompt)
    loops = split_loop_segments(text)
    raw = [(None, text)] if loops is None else loops
    segments = []
    for start, segment in raw:
        final = text_preprocessing(score_text_v1(segment, version, aes, flow, camera_motion))
        segments.append((start, final, _is_empty(text_preprocessing(segment))))
    return segments, extra


def _is_empty(cleaned: str) -> bool:
    """Nothing to describe a video: no letter or digit left (the cleaner turns a bare URL into '.')."""
    return not any(char.isalnum() for char in cleaned)


def dropped_cjk(text: str) -> str | None:
    """What the 1.x cleaner removes as CJK ideographs from `text`, said for a warning; None when nothing."""
    runs = _CJK.findall(text)
    if not runs:
        return None
    shown = ", ".join(runs)
    shown = shown if len(shown) <= 40 else shown[:40] + "..."
    return f"its CJK characters ({shown}): the 1.x caption cleaner removes them, as the official one does"


def unused_prompt_parts_v1(prompt: str) -> list[str]:
    """What an encode of a 1.x prompt does not use: the trailing JSON object (the official script's
    reference_path / mask_strategy), "|k|" loop segments no loop reaches (a repeated or lower marker after a higher
    one), and CJK ideographs (the cleaner removes them, as the official one does: its --llm-refine translated
    prompts to English first)."""
    text, extra = split_prompt_json(prompt)
    unused = [note] if (note := dropped_cjk(text)) else []
    if extra:
        unused.append(f"the prompt's JSON object ({', '.join(extra)}): connect Open-Sora Encode Reference instead")
    loops = split_loop_segments(text)
    if loops and len(loops) > 1:
        spans = _segment_spans([start for start, _segment in loops])
        used = {index for index, span in enumerate(spans) if span} | {len(loops) - 1}
        others = [f"|{start}| {segment!r}" for k, (start, segment) in enumerate(loops) if k not in used]
        if others:
            unused.append(f"the loop segment(s) {', '.join(others)}: no loop uses them (a later marker takes over)")
    return unused


def merged_prompt_v1(prompt: str, version: str, aes=None, flow=None, camera_motion=None) -> str:
    """All loop segments after scoring and cleaning, joined as the official script merges them."""
    segments, _extra = _segments_v1(prompt, version, aes, flow, camera_motion)
    if segments[0][0] is None:
        return segments[0][1]
    return "".join(f"|{start}|{text}" for start, text, _empty in segments)


def loop_count_v1(prompt: str) -> int:
    """How many generation loops of a 1.x prompt can differ in text: loop n >= count - 1 uses the text of loop
    count - 1 (1 without "|k|" segments; official extract_prompts_loop, including unordered markers)."""
    _check_str(prompt)
    text, _extra = split_prompt_json(prompt)
    loops = split_loop_segments(text)
    if not loops:
        return 1
    return sum(_segment_spans([start for start, _segment in loops])) + 1


def prompt_loops_v1(prompt: str, version: str, aes=None, flow=None, camera_motion=None, loops: int = 1) -> list[str]:
    """The final text for each of `loops` generation loops (1.x "|k|" prompts change text per loop)."""
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
    segments, _extra = _segments_v1(prompt, version, aes, flow, camera_motion)
    texts = []
    for loop in range(loops):
        index = 0 if segments[0][0] is None else _loop_segment_index([s[0] for s in segments], loop)
        _start, text, empty = segments[index]
        if empty:
            where = "" if segments[0][0] is None else f" (loop {loop} uses segment {index})"
            raise ValueError(
                f"the prompt is empty after caption cleaning{where}: {prompt!r}; the 1.x cleaner drops URLs, HTML, "
                "@handles and CJK ideographs. Write an English prompt (the official code would encode empty text)"
            )
        texts.append(text)
    return texts


def prompt_text_v1(prompt: str, version: str, aes=None, flow=None, camera_motion=None, loop: int = 0) -> str:
    """The exact T5 input text of Open-Sora 1.2 / 1.3 for generation loop `loop` (0-based).

    aes / flow: 1.2 numbers (" aesthetic score: 6.5."); 1.3 numbers or words (" The aesthetic score is
    excellent."). camera_motion: None, "none" or one of CAMERA_MOTIONS. A trailing JSON object is
    split off and ignored here (see split_prompt_json).
    """
    if isinstance(loop, bool) or not isinstance(loop, int) or loop < 0:
        raise ValueError(f"loop must be an integer >= 0, got {loop!r}")
    return prompt_loops_v1(prompt, version, aes, flow, camera_motion, loops=loop + 1)[loop]


def negative_prompt_text_v1(prompt: str) -> str:
    """A 1.x negative prompt as encoded: cleaned twice, no scores, no loop or JSON parsing (official 1.3; 1.2 has none).

    Raises ValueError when nothing is left; pass no negative prompt to use the learned null caption.
    """
    _check_str(prompt)
    text = text_preprocessing(prompt)
    if _is_empty(text):
        raise ValueError(
            f"the negative prompt is empty after caption cleaning: {prompt!r}; leave it unset to use the null caption"
        )
    return text


# ---------------------------------------------------------------------------------------------
# 2.0
# ---------------------------------------------------------------------------------------------

_FPS_SUFFIX = re.compile(r"\d+ FPS\.$")
_FPS_SENTENCE = re.compile(r"(?:^| )(\d+) FPS\.")


def fps_of_v2(text: str | None) -> int | None:
    """The frame rate a 2.0 prompt text states (' 24 FPS.', as prompt_text_v2 writes it), or None."""
    found = _FPS_SENTENCE.search(text or "")
    return int(found.group(1)) if found else None


def prompt_text_v2(prompt: str, fps: int = 24, motion_score: int | float | str | None = 4) -> str:
    """The exact T5 / CLIP input text of Open-Sora 2.0: 'raining, sea' -> 'raining, sea. 24 FPS. 4 motion score.'

    fps must be the frame rate the video is saved with (official fps_save, 24 in the configs).
    motion_score None adds no motion sentence; "dynamic" (GPT-predicted) is not supported offline.
    """
    _check_str(prompt)
    if not prompt.strip():
        raise ValueError("the prompt is empty; Open-Sora 2.0 would encode only '. 24 FPS. 4 motion score.'")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an integer >= 1 (the frame rate of the saved video), got {fps!r}")
    text = prompt.strip()
    if not text.endswith("."):
        text += "."
    if not _FPS_SUFFIX.search(text):
        text += f" {fps} FPS."
    if motion_score is None:
        return text
    if motion_score == "dynamic":
        raise ValueError(
            "motion_score 'dynamic' needs the official GPT prompt refiner; give a number (1 to 15) instead"
        )
    if isinstance(motion_score, str):
        if not re.fullmatch(r"\d+(\.\d+)?", motion_score.strip()):
            raise ValueError(f"motion_score must be a non-negative number or None, got {motion_score!r}")
        motion_score = motion_score.strip()
    elif _as_number(motion_score, "motion_score") < 0:
        raise ValueError(f"motion_score must be a non-negative number or None, got {motion_score!r}")
    return f"{text} {motion_score} motion score."


def prompt_text_t2i(prompt: str) -> str:
    """The 2.0 text-to-image (first frame) prompt: the raw prompt, no suffixes (official behaviour)."""
    _check_str(prompt)
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return prompt

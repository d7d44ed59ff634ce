"""The API soak test (scripts/soak.py), shortened to 20 prompts: 15 good, one of each bad kind, one interrupt.

The full 100-prompt run is `python scripts/soak.py`. The checks of the plan and of the error classifier
run without a server, so a soak that could never fail is caught here too.
"""

import pytest
import soak
from comfy_host import PromptResult


def test_plan_every_fifth_bad_one_interrupt_followed_by_a_good_prompt():
    kinds = soak.plan(100)
    assert len(kinds) == 100
    assert [kinds[i] for i in range(4, 100, 5)] == list(soak.BAD_KINDS) * 5
    assert kinds.count("interrupt") == 1 and kinds.count("good") == 79
    middle = kinds.index("interrupt")
    assert 45 <= middle <= 55 and kinds[middle + 1] == "good"
    short = soak.plan(20)
    assert sorted(k for k in short if k in soak.BAD_KINDS) == sorted(soak.BAD_KINDS)
    assert short[short.index("interrupt") + 1] == "good"


def test_plan_too_short_for_every_bad_kind_is_refused():
    with pytest.raises(ValueError, match="at least 20 prompts.*got 12"):
        soak.plan(12)


def execution_error(node_type: str, message: str, exception_type: str = "ValueError") -> PromptResult:
    return PromptResult(
        "id",
        "error",
        error={"node_type": node_type, "exception_message": message, "exception_type": exception_type},
    )


def test_error_check_accepts_the_specific_message_only():
    good = execution_error("OpenSoraEncodePrompt", "The prompt is empty: describe the video to generate.\n")
    assert soak.check_error("empty_prompt", good, "empty")[1] == ""
    traceback_only = execution_error("OpenSoraEncodePrompt", 'Traceback (most recent call last):\n  File "x"')
    assert "no message holds" in soak.check_error("empty_prompt", traceback_only, "empty")[1]
    generic = execution_error("OpenSoraEncodePrompt", "'prompt is empty'", exception_type="KeyError")
    assert soak.check_error("empty_prompt", generic, "empty")[1]
    other_node = execution_error("OpenSoraSampler", "The prompt is empty: describe the video to generate.")
    assert "expected OpenSoraEncodePrompt" in soak.check_error("empty_prompt", other_node, "empty")[1]
    accepted_by_mistake = PromptResult("id", "success")
    assert "expected error" in soak.check_error("empty_prompt", accepted_by_mistake, "empty")[1]


def test_error_check_reads_validation_errors_of_a_rejected_prompt():
    details = "num_frames - Open-Sora 1.3 takes 1 (an image) or 16k+1 frames: 17, 33, 49; got 50"
    rejected = PromptResult(
        None,
        "rejected",
        error={"node_errors": {"4": {"class_type": "OpenSoraEmptyLatentVideo", "errors": [{"details": details}]}}},
    )
    assert soak.check_error("frame_count", rejected, "50") == (details, "")
    assert "no message holds" in soak.check_error("frame_count", rejected, "51")[1]


@pytest.mark.soak
@pytest.mark.server
def test_soak_20_prompts_on_a_fresh_server(tmp_path):
    server = soak.boot_server(tmp_path / "base")
    try:
        # The 5% bound applies here too: with the server's fixed glibc trim threshold (soak.FIXED_TRIM_ENV)
        # RSS moves by under 1 MiB per prompt, so 5% (~50 MiB) over the 14 good prompts after the baseline
        # catches a leak of ~4 MiB per prompt, e.g. keeping every decoded video (7.5 MiB each).
        report = soak.run_soak(server, prompts=20)
    finally:
        server.stop()
    print(report.summary())
    assert not report.failures, report.summary()
    assert report.count("good", "success") == 15 and report.mp4s_verified == 15
    assert all(report.count(kind) == 1 and not report.failed(kind) for kind in soak.BAD_KINDS)
    assert report.count("interrupt", "interrupted") == 1
    assert report.server_answered_at_end and report.rss_after_first_good > 0
    assert abs(report.rss_delta) <= soak.RSS_TOLERANCE

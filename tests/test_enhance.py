"""Prompt rewriting against a local stand-in for an OpenAI-compatible chat endpoint: what is sent, the
retries, the fall-back to the prompt as given, and the `generate --prompt-enhancer` and `enhance` commands."""

import asyncio
import base64
import io
import logging
import re

import numpy as np
import pytest

pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402
from serve_helpers import chat_stand_in  # noqa: E402

from cogvideox import read_video  # noqa: E402
from cogvideox.batch import Line, read_prompts, split_lines  # noqa: E402
from cogvideox.cli import main  # noqa: E402
from cogvideox.enhance import (  # noqa: E402
    ENV_KEY,
    ENV_MODEL,
    ENV_URL,
    EXAMPLES,
    IMAGE_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    EnhancerError,
    PromptEnhancer,
)

REWRITTEN = "A grey cat sleeps on a woven mat by a sunny window; dust drifts in the light; the camera holds still."


@pytest.fixture(scope="module")
def endpoint():
    """Answers chat completions with REWRITTEN (quoted and padded, as chat models do), and records each
    request. By the idea sent: "down" always gets a 500, "flaky" a 503 on every other request (the first
    of each retried pair), "refused" a 400, "silent" an empty answer, "odd" a body that is no chat
    completion, "markdown" a Markdown answer of two lines with a heading and an @@."""
    flaky = [0]

    def respond(body):
        idea = body["messages"][-1]["content"]
        idea = idea if isinstance(idea, str) else idea[0]["text"]
        flaky[0] += idea == "flaky"
        if idea == "down" or (idea == "flaky" and flaky[0] % 2):
            return 500 if idea == "down" else 503
        if idea == "refused":
            return 400
        if idea == "locked":
            return 401
        if idea == "markdown":
            return "## A cat at dawn\n\nA cat stretches@@sunrise, the camera still."
        if idea == "marks":
            return "###"
        if idea == "odd":
            return {"object": "list", "data": []}
        return "" if idea == "silent" else f'  "{REWRITTEN}"\n'

    with chat_stand_in(respond) as (url, requests):
        yield url, requests


def fast(url, **kwargs):
    return PromptEnhancer(url, **({"attempts": 3, "backoff": 0.0, "timeout": 10.0} | kwargs))


def test_the_rewrite_and_what_is_sent(endpoint):
    url, requests = endpoint
    requests.clear()
    enhancer = fast(url + "/", model="chat-small", api_key="ek")
    assert enhancer.rewrite("cat on a mat") == REWRITTEN  # quotes and blanks around it removed
    [sent] = requests
    assert sent["authorization"] == "Bearer ek" and sent["body"]["model"] == "chat-small"
    messages = sent["body"]["messages"]
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[-1] == {"role": "user", "content": "cat on a mat"}
    # The worked examples sit between them, as alternating user and assistant turns.
    examples = [(q["content"], a["content"]) for q, a in zip(messages[1:-1:2], messages[2:-1:2])]
    assert examples == list(EXAMPLES) and len(messages) == 2 + 2 * len(EXAMPLES)
    assert {m["role"] for m in messages[1:-1:2]} == {"user"} and {m["role"] for m in messages[2:-1:2]} == {"assistant"}
    assert fast(url).rewrite("x") == REWRITTEN and requests[-1]["authorization"] is None  # no key, no header


def test_the_full_address_of_the_endpoint_is_taken_too(endpoint):
    url, requests = endpoint
    assert fast(url + "/chat/completions").rewrite("cat on a mat") == REWRITTEN
    assert fast(url + "/chat/completions/").url == url + "/chat/completions"


def test_transient_failures_are_retried_and_the_rest_are_not(endpoint, caplog):
    url, requests = endpoint
    requests.clear()
    assert fast(url).rewrite("flaky") == REWRITTEN and len(requests) == 2  # a 503, then the answer

    requests.clear()
    with pytest.raises(EnhancerError, match=r"failed \(3 attempts\): HTTP 500$"):
        fast(url).rewrite("down")
    assert len(requests) == 3
    for idea, reason in (("refused", "HTTP 400"), ("silent", "the answer is empty"),
                         ("odd", "the answer is not a chat completion")):  # fmt: skip
        requests.clear()
        with pytest.raises(EnhancerError) as error:
            fast(url).rewrite(idea)
        assert str(error.value) == f"the prompt enhancer at {url}/chat/completions failed: {reason}"
        assert len(requests) == 1  # the same request would get the same answer

    # A refused key says where the key comes from, sent or not.
    for key, hint in ((None, f"no key was sent: set ${ENV_KEY}"), ("k", f"the key from ${ENV_KEY} was refused")):
        with pytest.raises(EnhancerError, match=re.escape(f"failed: HTTP 401 ({hint})")):
            fast(url, api_key=key).rewrite("locked")

    # `enhance` gives None instead, with the reason in the log: the caller goes on with the prompt.
    with caplog.at_level(logging.WARNING, logger="cogvideox.enhance"):
        assert fast(url).enhance("refused") is None
    assert "failed: HTTP 400; using the prompt as given" in caplog.text


def test_an_unreachable_endpoint_is_tried_again_then_given_up():
    enhancer = fast("http://127.0.0.1:9/v1", attempts=2, timeout=5.0)  # nothing listens on port 9
    with pytest.raises(EnhancerError, match=r"at http://127.0.0.1:9/v1/chat/completions failed \(2 attempts\)"):
        enhancer.rewrite("a cat")
    assert asyncio.run(enhancer.aenhance("a cat")) is None


def test_the_event_loop_version_sends_the_same(endpoint):
    url, requests = endpoint
    requests.clear()
    assert asyncio.run(fast(url).aenhance("flaky")) == REWRITTEN
    assert fast(url).rewrite("flaky") == REWRITTEN
    assert requests[1]["body"] == requests[3]["body"] and len(requests) == 4


def test_a_first_frame_goes_along_as_a_small_jpeg(endpoint):
    url, requests = endpoint
    requests.clear()
    frame = np.zeros((1500, 3000, 3), np.uint8)
    frame[..., 0] = 200  # red
    assert fast(url).rewrite("the car drives off", Image.fromarray(frame)) == REWRITTEN
    system, user = requests[0]["body"]["messages"]
    assert system == {"role": "system", "content": IMAGE_SYSTEM_PROMPT}
    text, picture = user["content"]
    assert text == {"type": "text", "text": "the car drives off"} and picture["type"] == "image_url"
    head, data = picture["image_url"]["url"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert sent.shape == (512, 1024, 3)  # the longer side brought to 1024, the aspect ratio kept
    assert np.abs(sent.astype(int) - [200, 0, 0]).max() <= 3
    # A uint8 array is taken as well.
    assert fast(url).messages("x", frame[:20, :30])[1]["content"][1]["image_url"]["url"].startswith("data:image/jpeg")


def test_the_environment_names_the_endpoint(monkeypatch):
    from cogvideox.cli import build_parser as parser
    from cogvideox.cli_args import prompt_enhancer
    from cogvideox.errors import InputError

    monkeypatch.setenv(ENV_URL, "http://chat.internal/v1")
    monkeypatch.setenv(ENV_MODEL, "glm-4-plus")
    monkeypatch.setenv(ENV_KEY, "sk-1")
    # The defaults are read as the parser is built.
    args = parser().parse_args(["generate", "a cat"])
    enhancer = prompt_enhancer(args)
    assert (enhancer.url, enhancer.model, enhancer.headers) == (
        "http://chat.internal/v1/chat/completions", "glm-4-plus", {"Authorization": "Bearer sk-1"}
    )
    assert prompt_enhancer(parser().parse_args(["generate", "a cat", "--prompt-enhancer", "off"])) is None
    with pytest.raises(InputError, match="give the endpoint's address"):
        prompt_enhancer(parser().parse_args(["generate", "a cat", "--prompt-enhancer", "localhost:11434"]))
    monkeypatch.delenv(ENV_URL)
    assert prompt_enhancer(parser().parse_args(["generate", "a cat"])) is None


def test_generate_makes_the_video_of_the_rewritten_prompt(endpoint, capsys, tiny_rope_dir, tmp_path):
    url, _ = endpoint
    common = ["--model", str(tiny_rope_dir), "--steps", "1", "--height", "32", "--width", "32", "--seed", "5",
              "--quiet", "--max-sequence-length", "16"]  # fmt: skip
    assert main(["generate", "cat on a mat", "-o", str(tmp_path / "a.mp4"), "--prompt-enhancer", url, *common]) == 0
    out = capsys.readouterr().out
    assert f"prompt: {REWRITTEN}\n" in out
    assert main(["generate", REWRITTEN, "-o", str(tmp_path / "b.mp4"), *common]) == 0
    assert np.array_equal(read_video(tmp_path / "a.mp4")[0], read_video(tmp_path / "b.mp4")[0])

    # An endpoint that fails costs a warning, not the video.
    capsys.readouterr()
    assert main(["generate", "refused", "-o", str(tmp_path / "c.mp4"), "--prompt-enhancer", url, *common]) == 0
    captured = capsys.readouterr()
    assert "failed: HTTP 400; generating from the prompt as given" in captured.err
    assert "prompt:" not in captured.out and (tmp_path / "c.mp4").is_file()


def test_generate_refuses_an_enhancer_with_parallel(capsys):
    assert main(["generate", "a cat", "--prompt-enhancer", "http://x/v1", "--parallel", "cfg=2"]) == 2
    assert "--prompt-enhancer does not combine with --parallel" in capsys.readouterr().err


def test_the_enhance_command(endpoint, capsys, tmp_path):
    url, requests = endpoint
    ideas = tmp_path / "ideas.txt"
    ideas.write_text("# ideas\ncat on a mat\n\nflaky\n")
    requests.clear()
    assert main(["enhance", "a dog", "--file", str(ideas), "--prompt-enhancer", url]) == 0
    assert capsys.readouterr().out == f"{REWRITTEN}\n" * 3
    assert [r["body"]["messages"][-1]["content"] for r in requests] == ["a dog", "cat on a mat", "flaky", "flaky"]

    # A batch file's first frames stay on their lines, and the chat model sees them.
    Image.new("RGB", (32, 24), (0, 0, 255)).save(tmp_path / "blue.png")
    ideas.write_text("a cat jumps@@blue.png\nflaky\n")
    requests.clear()
    assert main(["enhance", "--file", str(ideas), "--prompt-enhancer", url]) == 0
    assert capsys.readouterr().out == f"{REWRITTEN}@@blue.png\n{REWRITTEN}\n"
    assert requests[0]["body"]["messages"][0]["content"] == IMAGE_SYSTEM_PROMPT
    assert requests[1]["body"]["messages"][0]["content"] == SYSTEM_PROMPT

    assert main(["enhance", "a dog", "down", "--prompt-enhancer", url]) == 1  # after the retries
    captured = capsys.readouterr()
    assert captured.out == f"{REWRITTEN}\n"  # what was rewritten before the failure is out
    assert captured.err.strip().endswith("failed (3 attempts): HTTP 500")
    assert "no rewrite of prompt 2 of 2 ('down'; the 1 before it are printed): the prompt enhancer" in captured.err
    assert main(["enhance", "--prompt-enhancer", url]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["enhance", "a dog", "--prompt-enhancer", "off"]) == 2
    assert f"no endpoint: give --prompt-enhancer URL (such as http://localhost:11434/v1) or set ${ENV_URL}" in (
        capsys.readouterr().err
    )


def test_an_enhanced_line_reads_back_as_one_prompt_of_a_batch_file(endpoint, capsys, tmp_path):
    url, _ = endpoint
    assert main(["enhance", "markdown", "marks", "a dog", "--prompt-enhancer", url]) == 0
    prompts = tmp_path / "prompts.txt"
    out, err = capsys.readouterr()
    prompts.write_text(out)
    assert split_lines(read_prompts(prompts)) == [
        Line("A cat at dawn A cat stretches@sunrise, the camera still."),
        Line("marks"),  # an answer of marks alone: the prompt as given keeps its line, and the numbering
        Line(REWRITTEN),
    ]
    assert "the rewrite of prompt 2 ('marks') holds no words; it is printed as given" in err

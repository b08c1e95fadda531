"""The web page in headless Chromium (Debian's, driven by Selenium), at a phone's size: submit a prompt,
watch the progress, the video plays in place with the right duration (frames / fps), delete it.
Screenshots of each stage go to tests/artifacts/serve/."""

import time

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import CHROMEDRIVER, CHROMIUM, artifacts_dir, chromium_or_skip, serving  # noqa: E402

from cogvideox.serve.app import Settings, create_app  # noqa: E402
from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.serve.spec import ModelSpec  # noqa: E402
from cogvideox.serve.worker import PipelineGenerator, Worker  # noqa: E402

PHONE = (412, 915)  # CSS pixels of a common Android phone

# Records every status / percent the cards show, so the test sees progress however fast it goes by.
OBSERVE = """
window.seen = [];
new MutationObserver(() => {
  for (const card of document.querySelectorAll('#videos .card')) {
    const entry = card.dataset.status + ' ' + card.querySelector('.percent').textContent;
    if (window.seen[window.seen.length - 1] !== entry) window.seen.push(entry);
  }
}).observe(document.querySelector('#videos'), {subtree: true, childList: true, characterData: true, attributes: true});
"""


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """One headless Chromium for the file's tests (starting one takes seconds). Each test serves the page
    on a port of its own, so none sees another's storage (an origin's localStorage is its own)."""
    chromium_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
        "--autoplay-policy=no-user-gesture-required", f"--window-size={PHONE[0]},{PHONE[1]}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log("browser")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium):
    """The browser on a blank page at a phone's size, with the console read so far dropped."""
    chromium.get("about:blank")
    chromium.set_window_size(*PHONE)
    chromium.get_log("browser")
    yield chromium
    chromium.get("about:blank")  # the test's page stops polling its server


def start_service(tiny_rope_dir, tmp_path, **settings):
    spec = ModelSpec.from_folder(tiny_rope_dir, "cogvideox-tiny", extra_sizes=("128x128",))
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    # A short lease renews (and reports progress) every 0.25 s, so a 2-second job shows several steps.
    worker = Worker(
        store, PipelineGenerator(str(tiny_rope_dir)), tmp_path, spec.name, lease_seconds=1, poll_interval=0.05
    )
    return store, serving(create_app(spec, store, Settings(data_dir=tmp_path, max_steps=1000, **settings), worker))


def start_queue(tiny_rope_dir, tmp_path, **settings):
    """The page over a queue without a worker: the test moves its jobs along (claim, fail) by hand."""
    spec = ModelSpec.from_folder(tiny_rope_dir, "cogvideox-tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    return store, serving(create_app(spec, store, Settings(data_dir=tmp_path, **settings)))


def submit_in_two_steps(browser, prompt: str) -> None:
    """Queue `prompt` from the page's form with 2 denoising steps (a quick video)."""
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.CSS_SELECTOR, "#options summary").click()
    steps = browser.find_element(By.ID, "num_inference_steps")
    steps.clear()
    steps.send_keys("2")
    browser.find_element(By.ID, "submit").click()


def queue_from_the_page(browser, wait, store, url: str, more: int):
    """Queue "video 0" from the page at `url` (so the jobs are its owner's), then "video 1" ... "video
    `more`" straight into `store`, as the page would; the first job is returned."""
    browser.get(url)
    browser.find_element(By.ID, "prompt").send_keys("video 0")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
    first = store.page()[0][0]
    for i in range(1, more + 1):
        store.create(first.model, first.owner, {**first.params, "prompt": f"video {i}"})
    return first


@pytest.fixture
def page_url(tiny_rope_dir, tmp_path):
    store, server = start_service(tiny_rope_dir, tmp_path)
    with server as url:
        yield url
    store.close()


def test_submit_watch_play_delete(browser, page_url):
    shots = artifacts_dir()
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    browser.get(page_url)
    wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
    browser.execute_script(OBSERVE)
    browser.save_screenshot(str(shots / "1-empty.png"))

    browser.find_element(By.ID, "prompt").send_keys("a panda plays a small guitar in the bamboo forest")
    browser.find_element(By.CSS_SELECTOR, "#options summary").click()
    browser.find_element(By.CSS_SELECTOR, "#size option[value='128x128']").click()
    steps = browser.find_element(By.ID, "num_inference_steps")
    steps.clear()
    steps.send_keys("1000")
    browser.find_element(By.ID, "seed").send_keys("42")
    browser.save_screenshot(str(shots / "2-form.png"))
    browser.find_element(By.ID, "submit").click()

    card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='in_progress']"))
    wait.until(lambda d: card.find_element(By.CSS_SELECTOR, ".percent").text not in ("", "0%"))
    browser.save_screenshot(str(shots / "3-in-progress.png"))

    video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed'] video"))
    wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 2", video))
    duration = browser.execute_script("return arguments[0].duration", video)
    assert duration == pytest.approx(9 / 8, abs=0.02)  # 9 frames at 8 fps
    # It plays: the clock moves (muted autoplay, looping).
    start = browser.execute_script("return arguments[0].currentTime", video)
    wait.until(lambda d: d.execute_script("return arguments[0].currentTime", video) != start)
    assert browser.execute_script("return !arguments[0].paused && arguments[0].error === null", video)
    width = browser.execute_script("return arguments[0].videoWidth", video)
    assert width == 128
    details = card.find_element(By.CSS_SELECTOR, ".details").text
    assert "seed 42" in details and "9 frames at 8 fps" in details and "1000 steps" in details
    assert card.find_element(By.CSS_SELECTOR, ".download").get_attribute("href").endswith("/content")
    gif = card.find_element(By.CSS_SELECTOR, ".gif")
    assert gif.is_displayed() and gif.get_attribute("href").endswith("/content?variant=gif")
    fetched = "return fetch(arguments[0].href).then(r => r.status + ' ' + r.headers.get('content-type'))"
    assert browser.execute_script(fetched, gif) == "200 image/gif"
    # Fits the phone's width: no sideways scrolling.
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.execute_script("arguments[0].scrollIntoView()", card)
    browser.save_screenshot(str(shots / "4-playing.png"))

    seen = browser.execute_script("return window.seen")
    percents = [int(s.split()[1][:-1]) for s in seen if s.startswith("in_progress ") and s.endswith("%")]
    assert any(0 < p < 100 for p in percents), seen  # progress was shown on the way
    assert seen[-1] == "completed "

    card.find_element(By.CSS_SELECTOR, ".delete").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#videos .card"))
    assert browser.find_element(By.ID, "empty").is_displayed()
    browser.save_screenshot(str(shots / "5-deleted.png"))


def asked_for_key(wait: WebDriverWait):
    """The API-key field, once the page shows the form that asks for it."""
    return wait.until(
        lambda d: d.find_element(By.ID, "api-key") if d.find_element(By.ID, "key-form").is_displayed() else None
    )


def test_a_completed_video_is_remixed_from_its_card(browser, tiny_rope_dir, tmp_path):
    """Remix on a card: the form says which video it redraws, starts from its prompt, offers a strength
    and not the size or length (the video's stay); the remix is a new card that says what it remixes."""
    store, server = start_service(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        submit_in_two_steps(browser, "a red ball")
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed']"))
        source = card.get_attribute("data-id")
        assert not browser.find_element(By.ID, "remixing").is_displayed()
        assert not browser.find_element(By.ID, "strength").is_displayed()

        card.find_element(By.CSS_SELECTOR, ".remix").click()
        assert browser.find_element(By.ID, "remixing").is_displayed()
        assert browser.find_element(By.ID, "remix-of").text == "a red ball"
        assert browser.find_element(By.ID, "submit").text == "Remix"
        assert not any(browser.find_element(By.ID, name).is_enabled() for name in ("size", "seconds"))
        assert browser.find_element(By.ID, "seed").get_attribute("placeholder") == "the video's"
        prompt = browser.find_element(By.ID, "prompt")
        assert prompt.get_attribute("value") == "a red ball"
        prompt.clear()
        prompt.send_keys("a blue ball")
        browser.find_element(By.ID, "strength").send_keys("0.5")
        browser.save_screenshot(str(artifacts_dir() / "11-remix-form.png"))
        browser.find_element(By.ID, "submit").click()

        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#videos .card[data-status='completed']")) == 2)
        newest = browser.find_element(By.CSS_SELECTOR, "#videos .card")  # the remix comes first
        assert newest.get_attribute("data-id") != source
        assert f"remix of {source} at strength 0.5" in newest.find_element(By.CSS_SELECTOR, ".details").text
        assert not browser.find_element(By.ID, "remixing").is_displayed()  # back to creating
        assert browser.find_element(By.ID, "submit").text == "Generate"
        assert browser.find_element(By.ID, "size").is_enabled()
        assert browser.find_element(By.ID, "seed").get_attribute("placeholder") == "random"
        [job] = [j for j in store.page(10, None)[0] if j.id == newest.get_attribute("data-id")]
        assert job.params["remix_of"] == source and job.params["prompt"] == "a blue ball"
    store.close()


def test_with_an_api_key_the_page_asks_for_it_and_plays_from_memory(browser, tiny_rope_dir, tmp_path):
    """A <video> cannot send a Bearer header: with a key the page fetches the MP4 and plays it as a blob."""
    store, server = start_service(tiny_rope_dir, tmp_path, api_keys=("sk-page",))
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        key = asked_for_key(wait)
        browser.save_screenshot(str(artifacts_dir() / "6-api-key.png"))
        key.send_keys("sk-page")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        submit_in_two_steps(browser, "a red sun")
        video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed'] video"))
        wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 1", video))
        assert video.get_attribute("src").startswith("blob:")
        assert browser.execute_script("return arguments[0].duration", video) == pytest.approx(9 / 8, abs=0.02)
        gif = browser.find_element(By.CSS_SELECTOR, "#videos .card .gif")  # fetched with the key when clicked
        gif.click()
        wait.until(lambda d: gif.get_attribute("href").startswith("blob:"))
        size = "return fetch(arguments[0].href).then(r => r.blob()).then(b => b.type + ' ' + b.size)"
        kind, length = browser.execute_script(size, gif).split()
        assert kind == "image/gif" and int(length) > 100
        browser.find_element(By.CSS_SELECTOR, "#videos .card .delete").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        assert store.page()[0] == []
    store.close()


# The page's first request for a video's file is answered 401, as a server does that no longer takes the key.
REFUSE_THE_FIRST_VIDEO = """
const real = window.fetch;
window.refused = false;
window.fetch = async (path, options) => {
  if (!window.refused && String(path).endsWith("/content")) {
    window.refused = true;
    const error = {error: {message: "invalid API key", type: "invalid_request_error"}};
    return new Response(JSON.stringify(error), {status: 401, headers: {"Content-Type": "application/json"}});
  }
  return real(path, options);
};
"""


def test_a_video_refused_for_its_key_is_fetched_with_the_key_given(browser, tiny_rope_dir, tmp_path):
    """A finished video whose file the server refuses (401): the page asks for the key, and once given,
    fetches the file with it and plays it, rather than leaving the card without its video."""
    store, server = start_service(tiny_rope_dir, tmp_path, api_keys=("sk-page",))
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        asked_for_key(wait).send_keys("sk-page", Keys.ENTER)
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        browser.execute_script(REFUSE_THE_FIRST_VIDEO)
        submit_in_two_steps(browser, "a red sun")
        key = asked_for_key(wait)
        assert browser.execute_script("return window.refused")
        key.clear()
        key.send_keys("sk-page", Keys.ENTER)
        video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed'] video"))
        wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 1", video))
        assert video.get_attribute("src").startswith("blob:")
        assert browser.execute_script("return arguments[0].duration", video) == pytest.approx(9 / 8, abs=0.02)
        assert browser.find_element(By.CSS_SELECTOR, "#videos .card .download").is_displayed()
    store.close()


def test_the_page_says_when_the_server_is_unreachable_and_recovers(browser, tiny_rope_dir, tmp_path):
    """The API unreachable (server down, restarting) from the page's first request: a plain message, not
    the browser's "Failed to fetch"; once it answers again the message goes and the model line comes."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    with server as url:
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/*"]})
        browser.get(url)
        message = browser.find_element(By.ID, "message")
        wait.until(lambda d: message.text)
        assert message.text == "cannot reach the server; is it running?"
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        wait.until(lambda d: message.text == "")
    store.close()


def test_a_wrong_api_key_is_said_to_be_wrong_and_not_kept(browser, tiny_rope_dir, tmp_path):
    store, server = start_queue(tiny_rope_dir, tmp_path, api_keys=("sk-page",))
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        key = asked_for_key(wait)
        assert browser.switch_to.active_element == key  # asked for, ready to type into
        assert not browser.find_element(By.ID, "empty").is_displayed()  # the list is unknown, not empty
        key.send_keys("sk-wrong", Keys.ENTER)
        message = browser.find_element(By.ID, "message")
        wait.until(lambda d: "refused" in message.text)
        time.sleep(3.5)  # past the next poll: it does not take the message back
        assert message.text == "the server refused this API key; enter the right one"
        assert browser.find_element(By.ID, "key-form").is_displayed()
        assert browser.execute_script("return localStorage.getItem('cogvideox-api-key')") is None
        key.clear()
        key.send_keys("sk-page", Keys.ENTER)
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        assert message.text == ""
        assert browser.execute_script("return localStorage.getItem('cogvideox-api-key')") == "sk-page"
    store.close()


def test_the_form_takes_what_the_api_takes(browser, tiny_rope_dir, tmp_path):
    """Each option's bounds are the API's: a guidance of 7.25 and the longest clip as the placeholder shows
    it are valid, a seed of 2**32 is not (the API would refuse it)."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "seconds").get_attribute("max"))
        valid = "const e = document.getElementById(arguments[0]); e.value = arguments[1]; return e.validity.valid"
        assert browser.execute_script(valid, "guidance_scale", "7.25")
        placeholder = browser.find_element(By.ID, "seconds").get_attribute("placeholder")
        assert browser.execute_script(valid, "seconds", placeholder), placeholder
        assert browser.execute_script(valid, "seed", str(2**32 - 1))
        assert not browser.execute_script(valid, "seed", str(2**32))
    store.close()


def test_a_wrong_value_in_the_closed_options_is_shown(browser, tiny_rope_dir, tmp_path):
    """A value out of range in a field of the closed Options: Generate opens them on that field (the browser
    points at it) and sends nothing; once right, the video is queued."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "seconds").get_attribute("max"))
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        summary = browser.find_element(By.CSS_SELECTOR, "#options summary")
        summary.click()
        seed = browser.find_element(By.ID, "seed")
        seed.send_keys(str(2**32))
        summary.click()
        assert not seed.is_displayed()
        browser.find_element(By.ID, "submit").click()
        assert seed.is_displayed() and browser.switch_to.active_element == seed
        time.sleep(0.3)
        assert store.page()[0] == []
        seed.clear()
        seed.send_keys("7")
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        [job] = store.page()[0]
        assert job.params["seed"] == 7
    store.close()


def test_a_value_left_in_a_hidden_option_neither_holds_the_form_back_nor_is_sent(browser, tiny_rope_dir, tmp_path):
    """A strength typed for a video to redraw, out of range, then the video removed: the strength goes with
    its option, disabled; the form is sent without it."""
    (tmp_path / "clip.mp4").write_bytes(b"not read: removed before sending")
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "seconds").get_attribute("max"))
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        browser.find_element(By.ID, "input_reference").send_keys(str(tmp_path / "clip.mp4"))
        strength = browser.find_element(By.ID, "strength")
        strength.send_keys("5")
        browser.find_element(By.ID, "remove-input").click()
        assert not strength.is_displayed() and not strength.is_enabled()
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        [job] = store.page()[0]
        assert job.params["prompt"] == "a red sun" and "strength" not in job.params
    store.close()


def test_a_failed_video_shows_its_error_as_text_within_a_phone_width(browser, tiny_rope_dir, tmp_path):
    """A worker's error, however long its words (a path), wraps inside the card: no sideways scrolling."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    error = "<b>cannot write</b> /data/" + "averylongfoldername" * 12 + "/video.mp4"
    with server as url:
        browser.get(url)
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        job = store.claim("worker", "cogvideox-tiny", 60)
        store.fail(job.id, "worker", "generation_failed", error)
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='failed']"))
        assert card.find_element(By.CSS_SELECTOR, ".error").text == error
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    store.close()


def test_the_page_loads_without_console_errors(browser, tiny_rope_dir, tmp_path):
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        WebDriverWait(browser, 10).until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        time.sleep(0.5)  # the favicon, which browsers ask for after the page
        assert [e["message"] for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    store.close()


def test_a_prompt_is_shown_as_text_in_its_own_direction(browser, tiny_rope_dir, tmp_path):
    """Markup in a prompt is text, never HTML; a right-to-left prompt reads right to left, where it is typed
    and on its card."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    prompt = "قطة تعزف على البيانو <img src=x onerror=alert(1)>!"
    with server as url:
        browser.get(url)
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        browser.find_element(By.ID, "submit").click()
        card = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card .prompt"))
        assert card.text == prompt
        assert browser.execute_script("return document.querySelectorAll('#videos img').length") == 0
        direction = "return getComputedStyle(arguments[0]).direction"
        assert browser.execute_script(direction, card) == "rtl"
        assert browser.execute_script(direction, browser.find_element(By.ID, "prompt")) == "rtl"
    store.close()


def test_ctrl_enter_in_the_prompt_generates(browser, tiny_rope_dir, tmp_path):
    """From the keyboard: Enter in the prompt is a new line, Ctrl+Enter submits it (once, however pressed)."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys("a red sun", Keys.CONTROL, Keys.ENTER, Keys.ENTER, Keys.NULL)
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        time.sleep(0.3)
        assert [job.params["prompt"] for job in store.page()[0]] == ["a red sun"]
        assert prompt.get_attribute("value") == "a red sun"
    store.close()


def test_a_cards_controls_say_which_video_they_act_on(browser, tiny_rope_dir, tmp_path):
    """To a screen reader every card has the same "Cancel" or "Delete": each is described by its prompt,
    and the progress bar has a name."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        browser.find_element(By.ID, "submit").click()
        card = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card"))
        described = "return document.getElementById(arguments[0].getAttribute('aria-describedby'))?.textContent"
        assert browser.execute_script(described, card.find_element(By.CSS_SELECTOR, ".delete")) == "a red sun"
        assert browser.execute_script(described, card.find_element(By.CSS_SELECTOR, ".download")) == "a red sun"
        assert card.find_element(By.TAG_NAME, "progress").accessible_name == "Progress"
    store.close()


def test_the_focus_stays_on_the_page_after_a_delete_or_a_cancelled_remix(browser, tiny_rope_dir, tmp_path):
    """From the keyboard: "Delete" on a card puts the focus on the next card's (the last card's on the one
    before it), the last one gone on the prompt; "Cancel remix" puts it on the prompt. Never on the page's
    body, where the next Tab starts over."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    with server as url:
        first = queue_from_the_page(browser, wait, store, url, more=2)
        while job := store.claim("worker", first.model, 60):
            store.complete(job.id, "worker", {})
        done = "#videos .card[data-status='completed']"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == 3)
        prompt = browser.find_element(By.ID, "prompt")

        browser.find_element(By.CSS_SELECTOR, "#videos .card .remix").send_keys(Keys.ENTER)
        assert browser.switch_to.active_element == prompt
        browser.find_element(By.ID, "stop-remix").send_keys(Keys.ENTER)
        assert not browser.find_element(By.ID, "remixing").is_displayed()
        assert browser.switch_to.active_element == prompt

        def focused_card():
            return browser.execute_script("return document.activeElement.closest('.card')?.dataset.id")

        ids = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, "#videos .card")]
        browser.find_element(By.CSS_SELECTOR, f".card[data-id='{ids[1]}'] .delete").send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#videos .card")) == 2)
        assert focused_card() == ids[2]  # the next card's "Delete"
        press(browser, Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#videos .card")) == 1)
        assert focused_card() == ids[0]  # the last card went: the one before it
        press(browser, Keys.ENTER)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        assert browser.switch_to.active_element == prompt
        assert store.page()[0] == []
    store.close()


def test_older_videos_are_a_click_away(browser, tiny_rope_dir, tmp_path):
    """The page lists the newest 50 videos and says when there are more: "Show older videos" lists 50 more
    each time (over pages of the API's), and goes once all are listed."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 20, poll_frequency=0.05)
    with server as url:
        queue_from_the_page(browser, wait, store, url, more=119)
        cards = lambda d: len(d.find_elements(By.CSS_SELECTOR, "#videos .card"))  # noqa: E731
        older = browser.find_element(By.ID, "older")
        newest = lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card .prompt").text  # noqa: E731
        # A refresh may list the store while the videos above are still being added: wait for one after
        # (the first card may be replaced between finding it and reading it).
        settled = WebDriverWait(browser, 20, 0.05, ignored_exceptions=[StaleElementReferenceException])
        settled.until(lambda d: newest(d) == "video 119" and cards(d) == 50 and older.is_displayed())
        older.click()
        wait.until(lambda d: cards(d) == 100)
        older.click()
        wait.until(lambda d: cards(d) == 120 and not older.is_displayed())
        prompts = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "#videos .card .prompt")]
        assert prompts == [f"video {i}" for i in range(119, -1, -1)]
    store.close()


# Holds the page's next list request until `window.release()`: a refresh caught in flight.
HOLD_THE_NEXT_LIST = """
const real = window.fetch;
window.held = false;
window.fetch = async (path, options) => {
  if (!window.held && String(path).startsWith("/v1/videos?")) {
    window.held = true;
    await new Promise((resolve) => { window.release = resolve; });
    const response = await real(path, options);
    window.answered = true;
    return response;
  }
  return real(path, options);
};
"""


def test_a_list_asked_for_with_a_forgotten_key_does_not_come_back(browser, tiny_rope_dir, tmp_path):
    """A refresh in flight when the key is forgotten answers with the old key's videos: they are not shown,
    nor does that refresh keep polling beside the one the new start began."""
    store, server = start_queue(tiny_rope_dir, tmp_path, api_keys=("sk-one",))
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        asked_for_key(wait).send_keys("sk-one", Keys.ENTER)
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        browser.find_element(By.ID, "submit").click()
        forget = browser.find_element(By.ID, "forget-key")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card") and forget.is_displayed())
        browser.execute_script(HOLD_THE_NEXT_LIST)
        wait.until(lambda d: d.execute_script("return window.held"))  # a refresh asked, with sk-one
        forget.click()
        wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        browser.execute_script("window.release()")  # its answer, sk-one's video, arrives now
        wait.until(lambda d: d.execute_script("return window.answered"))
        time.sleep(0.5)  # the time the page takes to read and show it
        assert not browser.find_elements(By.CSS_SELECTOR, "#videos .card")
    store.close()


def test_the_api_key_can_be_forgotten(browser, tiny_rope_dir, tmp_path):
    """"Forget API key" takes the key out of the browser's storage, clears the list it unlocked and asks
    again, so a shared computer keeps no key and another key can be given."""
    store, server = start_queue(tiny_rope_dir, tmp_path, api_keys=("sk-one",))
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        forget = browser.find_element(By.ID, "forget-key")
        key = asked_for_key(wait)
        assert not forget.is_displayed()  # no key yet
        key.send_keys("sk-one", Keys.ENTER)
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card") and forget.is_displayed())
        forget.click()
        wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        assert browser.execute_script("return localStorage.getItem('cogvideox-api-key')") is None
        assert not browser.find_elements(By.CSS_SELECTOR, "#videos .card") and not forget.is_displayed()
        assert key.get_attribute("value") == ""
    store.close()


def test_an_image_to_video_model_takes_a_first_frame_from_the_page(browser, tiny_i2v_dir, tmp_path):
    """With an image-to-video model the form asks for a picture (required), shows it, sends it with the fit
    chosen and an optional last frame; the card says what the video started from (and went to), and offers
    no remix (the API has none for it)."""
    from PIL import Image

    Image.new("RGB", (96, 48), (200, 40, 40)).save(tmp_path / "first.png")
    Image.new("RGB", (96, 48), (40, 40, 200)).save(tmp_path / "last.png")
    spec = ModelSpec.from_folder(tiny_i2v_dir, "cogvideox-tiny-i2v")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    worker = Worker(store, PipelineGenerator(str(tiny_i2v_dir)), tmp_path, spec.name, poll_interval=0.05)
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    with serving(create_app(spec, store, Settings(data_dir=tmp_path), worker)) as url:
        browser.get(url)
        wait.until(lambda d: "cogvideox-tiny-i2v" in d.find_element(By.ID, "model").text)
        picker = browser.find_element(By.ID, "input_reference")
        assert picker.is_displayed() and picker.get_attribute("required") is not None
        assert not browser.find_element(By.ID, "riflex-option").is_displayed()  # a learned position table
        submit_in_two_steps(browser, "a red ball")  # without the picture: the browser holds the form back
        assert not browser.find_elements(By.CSS_SELECTOR, "#videos .card")

        picker.send_keys(str(tmp_path / "first.png"))
        wait.until(lambda d: d.find_element(By.ID, "first-frame-preview").is_displayed())
        browser.find_element(By.CSS_SELECTOR, "#resize option[value='crop']").click()
        browser.find_element(By.ID, "last_frame").send_keys(str(tmp_path / "last.png"))  # optional
        browser.save_screenshot(str(artifacts_dir() / "12-first-frame.png"))
        browser.find_element(By.ID, "submit").click()
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed']"))
        assert "from first.png (crop) · to last.png" in card.find_element(By.CSS_SELECTOR, ".details").text
        assert not card.find_element(By.CSS_SELECTOR, ".remix").is_displayed()
        [job] = store.page(10, None)[0]
        assert (job.params["input_name"], job.params["resize"], job.params["num_inference_steps"]) == (
            "first.png", "crop", 2,
        )  # fmt: skip
        assert job.params["last_name"] == "last.png"
    store.close()


def test_riflex_doubles_the_longest_clip_the_form_takes(browser, tiny_rope_dir, tmp_path):
    """The longest clip is said exactly (9 frames at 8 fps: 1.125 s, not rounded over it), and twice as
    long (17 frames) with RIFLEx."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        wait = WebDriverWait(browser, 10)
        wait.until(lambda d: d.find_element(By.ID, "seconds").get_attribute("max"))
        assert browser.find_element(By.ID, "model").text == "cogvideox-tiny · 64x64 · 1.125 s at 8 fps"
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        seconds = browser.find_element(By.ID, "seconds")
        assert (seconds.get_attribute("max"), seconds.get_attribute("title")) == ("1.125", "at most 1.125 s")
        browser.find_element(By.ID, "riflex").click()
        assert (seconds.get_attribute("max"), seconds.get_attribute("title")) == ("2.125", "at most 2.125 s")
        browser.find_element(By.ID, "seconds").send_keys("2")
        browser.find_element(By.ID, "prompt").send_keys("a long ride")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        [job] = store.page(10, None)[0]
        assert (job.params["num_frames"], job.params["riflex"]) == (17, True)
    store.close()


# The box of an element, and of the words of a label (its text nodes), in CSS pixels: [left, top, right, bottom].
BOX = "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]"
WORDS = """
const range = document.createRange();
range.selectNodeContents(arguments[0]);
range.setStartAfter(arguments[0].querySelector('input'));
const r = range.getBoundingClientRect();
return [r.left, r.top, r.right, r.bottom];
"""


def test_the_riflex_checkbox_sits_beside_its_words(browser, tiny_rope_dir, tmp_path):
    """"Longer clips (RIFLEx)" is a small box on the line of its words, not a field-wide box above them, at a
    phone's width and a desktop's; on the desktop's row of options it is level with the seed's field."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    offered = lambda d: d.find_element(By.ID, "riflex-option").get_attribute("hidden") is None  # noqa: E731
    with server as url:
        for width, height in (PHONE, (1024, 800)):
            browser.set_window_size(width, height)
            browser.get(url)
            WebDriverWait(browser, 10).until(offered)
            browser.find_element(By.CSS_SELECTOR, "#options summary").click()
            left, top, right, bottom = browser.execute_script(BOX, browser.find_element(By.ID, "riflex"))
            words = browser.execute_script(WORDS, browser.find_element(By.ID, "riflex-option"))
            assert right - left < 30, width
            assert right <= words[0] and words[1] <= (top + bottom) / 2 <= words[3], width  # before them, level
        seed = browser.execute_script(BOX, browser.find_element(By.ID, "seed"))
        assert abs((top + bottom) / 2 - (seed[1] + seed[3]) / 2) < 3  # in the seed's row, level with its field
        browser.save_screenshot(str(artifacts_dir() / "14-riflex-option.png"))
    store.close()


def test_a_text_to_video_model_redraws_a_video_chosen_on_the_page(browser, tiny_rope_dir, tmp_path):
    """With a text-to-video model the form takes an optional video to redraw: choosing one offers the fit
    and the strength, and the card says what it redrew."""
    import numpy as np

    from cogvideox.video import export_video

    frames = np.zeros((17, 32, 48, 3), np.uint8)
    frames[..., 2] = 180
    export_video(frames, tmp_path / "clip.mp4", fps=8)
    store, server = start_service(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        picker = browser.find_element(By.ID, "input_reference")
        assert browser.find_element(By.ID, "input-label").text == "Video to redraw (optional)"
        assert picker.get_attribute("required") is None and picker.get_attribute("accept") == "video/*"
        assert not browser.find_element(By.ID, "last_frame").is_displayed()  # image-to-video models only
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        assert not browser.find_element(By.ID, "strength").is_displayed()
        picker.send_keys(str(tmp_path / "clip.mp4"))
        wait.until(lambda d: d.find_element(By.ID, "strength").is_displayed())
        assert browser.find_element(By.ID, "resize").is_displayed()
        assert not browser.find_element(By.ID, "first-frame-preview").is_displayed()  # pictures only
        browser.find_element(By.ID, "strength").send_keys("0.5")
        browser.find_element(By.ID, "prompt").send_keys("a red ball")
        steps = browser.find_element(By.ID, "num_inference_steps")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.ID, "submit").click()
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed']"))
        assert "from clip.mp4 (stretch) at strength 0.5" in card.find_element(By.CSS_SELECTOR, ".details").text
        [job] = store.page(10, None)[0]
        assert (job.params["input_name"], job.params["strength"], job.params["num_frames"]) == ("clip.mp4", 0.5, 9)
    store.close()


def press(browser, *keys) -> None:
    """Keys pressed on the page (on whatever has the focus), as a keyboard user does."""
    webdriver.ActionChains(browser).send_keys(*keys).perform()


def test_a_chosen_file_can_be_removed(browser, tiny_rope_dir, tiny_i2v_dir, tmp_path):
    """Beside a chosen file, a "Remove" (the next stop of Tab, pressed with Enter) unchooses it, and what it
    offered goes with it (a video's strength); the picker keeps the focus. The video sent without it has
    none; so too an image-to-video model's last frame."""
    from PIL import Image

    (tmp_path / "clip.mp4").write_bytes(b"not read: removed before sending")
    Image.new("RGB", (96, 48), (200, 40, 40)).save(tmp_path / "first.png")
    store, server = start_queue(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    with server as url:
        browser.get(url)
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        remove, picker = browser.find_element(By.ID, "remove-input"), browser.find_element(By.ID, "input_reference")
        assert not remove.is_displayed()  # nothing to remove
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        picker.send_keys(str(tmp_path / "clip.mp4"))
        wait.until(lambda d: d.find_element(By.ID, "strength").is_displayed() and remove.is_displayed())
        browser.execute_script("arguments[0].focus()", picker)
        press(browser, Keys.TAB)
        assert browser.switch_to.active_element == remove
        press(browser, Keys.ENTER)
        assert browser.execute_script("return arguments[0].files.length", picker) == 0
        assert not remove.is_displayed() and not browser.find_element(By.ID, "strength").is_displayed()
        assert browser.switch_to.active_element == picker
        browser.find_element(By.ID, "prompt").send_keys("a red ball")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        [job] = store.page(10, None)[0]
        assert "input_name" not in job.params and "strength" not in job.params
    store.close()
    spec = ModelSpec.from_folder(tiny_i2v_dir, "cogvideox-tiny-i2v")
    store = SQLiteStore(tmp_path / "i2v.sqlite3")
    with serving(create_app(spec, store, Settings(data_dir=tmp_path / "i2v"))) as url:
        browser.get(url)
        wait.until(lambda d: d.find_element(By.ID, "last_frame").is_displayed())
        browser.find_element(By.ID, "input_reference").send_keys(str(tmp_path / "first.png"))
        last, remove = browser.find_element(By.ID, "last_frame"), browser.find_element(By.ID, "remove-last")
        last.send_keys(str(tmp_path / "first.png"))
        wait.until(lambda d: remove.is_displayed())
        remove.click()
        assert browser.execute_script("return arguments[0].files.length", last) == 0 and not remove.is_displayed()
        browser.find_element(By.ID, "prompt").send_keys("a red ball")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        [job] = store.page(10, None)[0]
        assert job.params["input_name"] == "first.png" and "last_name" not in job.params
    store.close()


def test_a_served_lora_is_chosen_on_the_page(browser, tiny_rope_dir, tmp_path):
    """A server with LoRAs offers them (and their scale) in the form; the job names the one chosen and its card
    says so. A server without any shows no such field."""
    spec = ModelSpec.from_folder(tiny_rope_dir, "cogvideox-tiny", loras=("style", "motion"))
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    with serving(create_app(spec, store, Settings(data_dir=tmp_path))) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 10)
        wait.until(lambda d: d.find_element(By.ID, "lora").find_elements(By.TAG_NAME, "option"))
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        options = browser.find_element(By.ID, "lora").find_elements(By.TAG_NAME, "option")
        assert [o.text for o in options] == ["none", "style", "motion"]
        options[1].click()
        browser.find_element(By.ID, "lora_scale").send_keys("0.5")
        browser.find_element(By.ID, "prompt").send_keys("a cat in a hat")
        browser.find_element(By.ID, "submit").click()
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card"))
        [job] = store.page(10, None)[0]
        assert job.params["lora"] == [["style", 0.5]]
        wait.until(lambda d: "LoRA style ×0.5" in card.find_element(By.CSS_SELECTOR, ".details").text)
        browser.save_screenshot(str(artifacts_dir() / "13-lora.png"))
    store.close()
    store, server = start_queue(tiny_rope_dir, tmp_path / "plain")
    with server as url:
        browser.get(url)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "seconds").get_attribute("max"))
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        assert not browser.find_element(By.ID, "lora").is_displayed()
    store.close()


def contrast(first: str, second: str) -> float:
    """The WCAG contrast ratio (1 to 21) of two opaque colours as the browser computes them: "rgb(r, g, b)"."""

    def luminance(color: str) -> float:
        channels = [int(c) / 255 for c in color[color.index("(") + 1 : -1].split(",")[:3]]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_a_fields_edge_stands_out_from_the_field_and_the_page(browser, tiny_rope_dir, tmp_path):
    """The border is all that shows where a field is (WCAG 1.4.11, non-text contrast): 3:1 at least against
    the white inside and the page around, for every field of the form, Options open."""
    assert contrast("rgb(0, 0, 0)", "rgb(255, 255, 255)") == pytest.approx(21)
    store, server = start_queue(tiny_rope_dir, tmp_path)
    with server as url:
        browser.get(url)
        WebDriverWait(browser, 10).until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        page = browser.execute_script("return getComputedStyle(document.documentElement).backgroundColor")
        fields = browser.find_elements(By.CSS_SELECTOR, "#create textarea, #create input:not([type=checkbox]), select")
        fields = [field for field in fields if field.is_displayed()]
        assert len(fields) >= 8  # the prompt, the file, the negative prompt, size, seconds, steps, guidance, seed
        colors = "const style = getComputedStyle(arguments[0]); return [style.borderTopColor, style.backgroundColor]"
        for field in fields:
            edge, inside = browser.execute_script(colors, field)
            assert min(contrast(edge, inside), contrast(edge, page)) >= 3, (field.get_attribute("id"), edge)
    store.close()


def test_a_videos_new_status_is_told_to_a_screen_reader(browser, tiny_rope_dir, tmp_path):
    """A card's status changes without the focus there: a log (a polite live region, not shown) says which
    video started, and which failed and why; a reload tells nothing of what was already so."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    news = lambda d: d.find_element(By.ID, "news").get_attribute("textContent")  # noqa: E731
    with server as url:
        browser.get(url)
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        assert browser.find_element(By.ID, "news").aria_role == "log"
        job = store.claim("worker", "cogvideox-tiny", 60)
        wait.until(lambda d: news(d) == "Video “a red sun” in progress")
        store.fail(job.id, "worker", "generation_failed", "cannot write the video")
        wait.until(lambda d: news(d).endswith("Video “a red sun” failed: cannot write the video"))
        browser.refresh()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card[data-status='failed']"))
        time.sleep(0.5)  # a poll or two
        assert news(browser) == ""
    store.close()


def test_a_video_and_its_progress_say_what_they_show(browser, tiny_rope_dir, tmp_path):
    """The soundless clip's text alternative: named by its prompt, described by its settings (seed, size,
    frames). Each card's progress bar is described by its prompt: which of the bars named "Progress" it is."""
    store, server = start_service(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    described = "return document.getElementById(arguments[0].getAttribute('aria-describedby'))?.textContent"
    with server as url:
        browser.get(url)
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        submit_in_two_steps(browser, "a red sun")
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card"))
        assert browser.execute_script(described, card.find_element(By.TAG_NAME, "progress")) == "a red sun"
        video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed'] video"))
        wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 2", video))  # (one that cannot
        assert video.accessible_name == "a red sun"  # play is named "Unable to play media." by Chromium)
        assert " · 2 steps" in browser.execute_script(described, video)
    store.close()


def test_the_prompt_says_when_it_remixes(browser, tiny_rope_dir, tmp_path):
    """Remix puts the focus on the prompt, past the note above it: the prompt is described by the note (which
    video it redraws), and no longer once the remix is cancelled."""
    store, server = start_queue(tiny_rope_dir, tmp_path)
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    described = "return document.getElementById(arguments[0].getAttribute('aria-describedby'))?.textContent"
    with server as url:
        browser.get(url)
        browser.find_element(By.ID, "prompt").send_keys("a red sun")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos .card"))
        job = store.claim("worker", "cogvideox-tiny", 60)
        store.complete(job.id, "worker", {})
        remix = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-status='completed'] .remix"))
        wait.until(lambda d: remix.is_displayed())
        remix.click()
        prompt = browser.switch_to.active_element
        assert prompt.get_attribute("id") == "prompt"
        note = " ".join(browser.execute_script(described, prompt).split())
        assert note == "Remixing a red sun: the video redrawn for the prompt below."
        browser.find_element(By.ID, "stop-remix").click()
        assert prompt.get_attribute("aria-describedby") is None
    store.close()


def test_a_finished_video_waits_for_a_click_when_less_motion_is_asked_for(browser, page_url):
    """Videos play at once on a loop; a user whose system asks for reduced motion gets them paused, with
    their controls, until played."""
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-reduced-motion",
                                                                          "value": "reduce"}]})  # fmt: skip
    try:
        browser.get(page_url)
        wait.until(lambda d: "cogvideox-tiny" in d.find_element(By.ID, "model").text)
        submit_in_two_steps(browser, "a red ball rolls left")
        video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#videos .card[data-status='completed'] video"))
        wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 2", video))
        time.sleep(0.5)
        state = "return [arguments[0].autoplay, arguments[0].paused, arguments[0].currentTime, arguments[0].controls]"
        assert browser.execute_script(state, video) == [False, True, 0, True]
        browser.execute_script("arguments[0].play()", video)
        wait.until(lambda d: d.execute_script("return arguments[0].currentTime > 0", video))
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

"""A client of an OpenAI-compatible `/chat/completions` endpoint (OpenAI, GLM, vLLM, llama.cpp, Ollama...),
for the helpers that ask a chat model for text: the prompt enhancer (`enhance.py`) and the captioner of
training videos (`caption.py`).

Transient failures (no connection, a timeout, 408, 429 or 5xx) are tried again with a doubling backoff;
any other answer is final. Pictures go in a message as JPEG data URLs, the form every such endpoint
whose model sees images takes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

from cogvideox.errors import CogVideoXError

_RETRIED_STATUS = {408, 429, 500, 502, 503, 504}  # worth another try; other answers will not change


class ChatError(CogVideoXError):
    """The endpoint answered nothing usable (after any retries)."""


class ChatEndpoint:
    """`base_url` such as http://host:port/v1 (or the full http://host:port/v1/chat/completions); `attempts`
    tries per request, `backoff` seconds before the second (doubling after). A subclass names what it is
    (`role`, in messages) and its error type."""

    role = "the chat endpoint"
    error: type[ChatError] = ChatError
    key_variable: str | None = None  # the environment variable its API key comes from, for a refusal's hint

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        attempts: int = 3,
        backoff: float = 1.0,
    ) -> None:
        # The endpoint's full address, as API pages show it, is taken too: the path is not doubled.
        self.url = base_url.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff

    def body(self, messages: list[dict], max_tokens: int = 300, temperature: float = 0.7) -> dict:
        return {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}

    def complete(self, body: dict) -> str:
        """The answer's text (quotes and spaces around it removed); `self.error` saying why when every
        attempt fails."""
        import httpx

        with httpx.Client(timeout=self.timeout) as client:
            attempt = 0
            while True:  # until an answer, or `_check_retry` gives up
                try:
                    return self._answer(client.post(self.url, json=body, headers=self.headers))
                except (httpx.HTTPError, ChatError) as e:
                    self._check_retry(e, attempt)
                time.sleep(self.backoff * 2**attempt)
                attempt += 1

    async def acomplete(self, body: dict) -> str:
        """`complete` for an event loop."""
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout) as client:
            attempt = 0
            while True:  # until an answer, or `_check_retry` gives up
                try:
                    return self._answer(await client.post(self.url, json=body, headers=self.headers))
                except (httpx.HTTPError, ChatError) as e:
                    self._check_retry(e, attempt)
                await asyncio.sleep(self.backoff * 2**attempt)
                attempt += 1

    def _check_retry(self, error: Exception, attempt: int) -> None:
        """Return to try again after `error`, or raise `self.error` saying why not."""
        import httpx

        transient = isinstance(error, httpx.TransportError) or (
            isinstance(error, httpx.HTTPStatusError) and error.response.status_code in _RETRIED_STATUS
        )
        if transient and attempt + 1 < self.attempts:
            return
        tries = f" ({attempt + 1} attempts)" if attempt else ""
        why = _describe(error) + self._key_hint(error)
        raise self.error(f"{self.role} at {self.url} failed{tries}: {why}") from None

    def _key_hint(self, error: Exception) -> str:
        """For an answer of 401 or 403: whether a key was sent, and where it comes from."""
        import httpx

        if not (isinstance(error, httpx.HTTPStatusError) and error.response.status_code in (401, 403)):
            return ""
        where = f"${self.key_variable}" if self.key_variable else "its API key"
        return f" (the key from {where} was refused)" if self.headers else f" (no key was sent: set {where})"

    def _answer(self, response) -> str:
        """The text of a chat completion response, or `ChatError`."""
        response.raise_for_status()
        try:
            text = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatError("the answer is not a chat completion") from None
        text = text.strip().strip('"').strip() if isinstance(text, str) else ""
        if not text:
            raise ChatError("the answer is empty")
        return text


def _describe(error: Exception) -> str:
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    return str(error) or type(error).__name__


def jpeg_part(image, side: int = 1024) -> dict:
    """A message part holding an image (a file path, a PIL image or a uint8 [H, W, 3] array, as
    `conditioning.load_image` takes) as a JPEG data URL, its longer side at most `side`."""
    from cogvideox.conditioning import load_image

    picture = load_image(image)
    picture.thumbnail((side, side))  # in place, keeps the aspect ratio, never enlarges
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}

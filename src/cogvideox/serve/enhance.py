"""Prompt enhancement: a short prompt rewritten into a detailed one by a chat model, as the official demos do.

CogVideoX was trained on long, dense captions; a few words give weaker videos than a paragraph that names
the subject, its motion, the setting, the light and the camera. Any OpenAI-compatible chat endpoint works
(`--prompt-enhancer http://host:port/v1`); it is off unless configured.
"""

from __future__ import annotations

import logging

import httpx

log = logging.getLogger("cogvideox.serve")

SYSTEM_PROMPT = (
    "You turn a short idea for a video into one detailed description for a text-to-video model. "
    "Describe the main subject and what it does, the setting, the lighting, colours and mood, and how the "
    "camera moves, in plain present-tense sentences. Keep every element of the idea and invent nothing that "
    "contradicts it. Stay under 120 words. Reply with the description only: no title, no quotes, no list."
)


class PromptEnhancer:
    """Client of an OpenAI-compatible `/chat/completions` endpoint that rewrites prompts."""

    def __init__(
        self, base_url: str, model: str = "gpt-4o-mini", api_key: str | None = None, timeout: float = 30.0
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    async def enhance(self, prompt: str) -> str | None:
        """The rewritten prompt; None when the endpoint fails or answers nothing usable (the caller then
        generates from the prompt as given: a missing enhancer must not block the queue)."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            "temperature": 0.7,
            "max_tokens": 250,
        }
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(self.url, json=body, headers=self.headers)
                response.raise_for_status()
                text = response.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            log.warning("prompt enhancer at %s failed (%s); using the prompt as given", self.url, e)
            return None
        text = text.strip().strip('"').strip() if isinstance(text, str) else ""
        return text or None

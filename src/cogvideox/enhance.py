"""Prompt enhancement: a short idea rewritten into the long, dense caption CogVideoX was trained on.

CogVideoX learned from paragraph-long captions; a few words give a weaker video than a description that
names the subject, its motion, the setting, the light and the camera. The official demos therefore send
every prompt through a chat model first. Any OpenAI-compatible `/chat/completions` endpoint works here
(OpenAI, GLM, vLLM, llama.cpp, Ollama...). With a first frame (image-to-video) the frame goes along as an
image, for endpoints whose model sees images.

A failing endpoint never costs a video: transient failures (no connection, a timeout, 429 or 5xx) are
retried (`chat.ChatEndpoint`), and when every attempt fails the caller gets None and generates from the
prompt as given.
"""

from __future__ import annotations

import logging

from cogvideox.chat import ChatEndpoint, ChatError, jpeg_part

log = logging.getLogger("cogvideox.enhance")

# Where `--prompt-enhancer` and `--enhancer-model` take their defaults, and the endpoint's key.
ENV_URL = "COGVIDEOX_PROMPT_ENHANCER"
ENV_MODEL = "COGVIDEOX_ENHANCER_MODEL"
ENV_KEY = "COGVIDEOX_ENHANCER_API_KEY"
DEFAULT_MODEL = "gpt-4o-mini"

SYSTEM_PROMPT = (
    "You turn a short idea for a video into one detailed description for a text-to-video model. "
    "Describe the main subject and what it does, the setting, the lighting, colours and mood, and how the "
    "camera moves, in plain present-tense sentences. Keep every element of the idea and invent nothing that "
    "contradicts it. Stay under 120 words. Reply with the description only: no title, no quotes, no list."
)

IMAGE_SYSTEM_PROMPT = (
    "You write the description a video model needs to animate a still image: the image is the video's "
    "first frame. Describe what is in the frame as it is (subject, setting, light, colours), then what "
    "moves and how during the next six seconds, and how the camera moves, following the user's idea. "
    "Never describe anything that contradicts the image. Present tense, under 120 words. Reply with the "
    "description only: no title, no quotes, no list."
)

# Worked examples sent before the user's idea: small local models follow the form far better with them.
EXAMPLES = (
    (
        "a dog on a beach",
        "A golden retriever runs along the wet sand of a wide beach at sunset, its ears flapping and paws "
        "throwing up small splashes where the waves reach it. Low orange light skims the water and casts "
        "long shadows; gulls circle above gentle surf under a pink and violet sky. The camera tracks beside "
        "the dog at its height, then slows as it stops to look out to sea.",
    ),
    (
        "city at night, rain",
        "Rain falls on a narrow city street at night, and neon signs in red and blue shimmer in the puddles "
        "on the asphalt. People under black umbrellas hurry past lit shop windows while a yellow taxi rolls "
        "slowly through the reflections, its wipers sweeping. Steam rises from a grate. The camera glides "
        "forward at street level, drops of water catching the light in the foreground.",
    ),
)


class EnhancerError(ChatError):
    """The endpoint answered nothing usable (after any retries)."""


class PromptEnhancer(ChatEndpoint):
    """Client of an OpenAI-compatible chat endpoint (`base_url` such as http://host:port/v1) that rewrites
    prompts. `attempts` tries per prompt, `backoff` seconds before the second (doubling after)."""

    role = "the prompt enhancer"
    error = EnhancerError
    key_variable = ENV_KEY

    def __init__(
        self,
        base_url: str,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        timeout: float = 60.0,
        attempts: int = 3,
        backoff: float = 1.0,
    ) -> None:
        super().__init__(base_url, model, api_key, timeout, attempts, backoff)

    def messages(self, prompt: str, image=None) -> list[dict]:
        """The chat sent for `prompt`: the instructions, the worked examples, then the idea (with the first
        frame, a file path, a PIL image or uint8 [H, W, 3], as a JPEG when given)."""
        chat = [{"role": "system", "content": IMAGE_SYSTEM_PROMPT if image is not None else SYSTEM_PROMPT}]
        if image is None:
            for idea, description in EXAMPLES:
                chat += [{"role": "user", "content": idea}, {"role": "assistant", "content": description}]
            chat.append({"role": "user", "content": prompt})
        else:
            chat.append({"role": "user", "content": [{"type": "text", "text": prompt}, jpeg_part(image)]})
        return chat

    def rewrite(self, prompt: str, image=None) -> str:
        """The rewritten prompt; `EnhancerError` saying why when every attempt fails."""
        return self.complete(self.body(self.messages(prompt, image)))

    async def arewrite(self, prompt: str, image=None) -> str:
        """`rewrite` for an event loop."""
        return await self.acomplete(self.body(self.messages(prompt, image)))

    def enhance(self, prompt: str, image=None) -> str | None:
        """`rewrite`, or None (logged as a warning) when it fails: the caller goes on with the prompt."""
        try:
            return self.rewrite(prompt, image)
        except EnhancerError as e:
            log.warning("%s; using the prompt as given", e)
            return None

    async def aenhance(self, prompt: str, image=None) -> str | None:
        """`enhance` for an event loop."""
        try:
            return await self.arewrite(prompt, image)
        except EnhancerError as e:
            log.warning("%s; using the prompt as given", e)
            return None

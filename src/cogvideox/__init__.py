"""CogVideoX text-to-video, written from the paper (arXiv 2408.06072).

    from cogvideox import Pipeline, export_video

    pipe = Pipeline.from_pretrained("THUDM/CogVideoX-2b")  # or a local folder; None = the demo model
    video = pipe("a panda playing a guitar in a bamboo forest", seed=42).frames[0]
    export_video(video, "panda.mp4", fps=pipe.default_fps)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names -> the module defining them. Imported on first use, so `import cogvideox` (and the CLI's
# --help) stays fast and the package's modules can import each other without cycles through here.
_EXPORTS = {
    "Pipeline": "cogvideox.pipeline",
    "VideoOutput": "cogvideox.pipeline",
    "VideoAutoencoder": "cogvideox.autoencoder",
    "LatentVideo": "cogvideox.latents",
    "export_video": "cogvideox.video",
    "read_video": "cogvideox.video",
    "CogVideoXError": "cogvideox.errors",
    "InputError": "cogvideox.errors",
    "LoadError": "cogvideox.errors",
    "NonFiniteError": "cogvideox.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # the `X as X` form marks each import as a re-export for type checkers and linters
    from cogvideox.autoencoder import VideoAutoencoder as VideoAutoencoder
    from cogvideox.errors import CogVideoXError as CogVideoXError
    from cogvideox.errors import InputError as InputError
    from cogvideox.errors import LoadError as LoadError
    from cogvideox.errors import NonFiniteError as NonFiniteError
    from cogvideox.latents import LatentVideo as LatentVideo
    from cogvideox.pipeline import Pipeline as Pipeline
    from cogvideox.pipeline import VideoOutput as VideoOutput
    from cogvideox.video import export_video as export_video
    from cogvideox.video import read_video as read_video

def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cogvideox' has no attribute {name!r}")

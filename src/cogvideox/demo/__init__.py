"""The embedded demo: a small model trained on a synthetic world of captioned videos.

`world` renders the videos and their captions and holds the train / held-out split; `judge` reads a
video's pixels and tells the moving object's colour and direction, to score what a model generates.
"""

from pathlib import Path

# The demo model's folder, in the official layout; `Pipeline.from_pretrained()` loads it when no model
# is named. Rebuilt from scratch by `python -m cogvideox.demo.build`.
DEMO_MODEL_DIR = Path(__file__).parent / "weights"

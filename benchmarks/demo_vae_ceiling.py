"""How much of the demo model's prompt-following error is the VAE's: reconstruct world videos of every
caption of a split and let the judge read them.

    python benchmarks/demo_vae_ceiling.py                      # held-out captions, 2 scenes each
    python benchmarks/demo_vae_ceiling.py --split train --scenes 1 --model path/to/model

Every generated video passes the VAE's decoder, so the share of reconstructions the judge reads right is
a ceiling on the whole model's score; a caption whose reconstructions all read right puts its generated
failures on the transformer. Prints each wrong reconstruction and the total.
"""

from __future__ import annotations

import argparse

import numpy as np

from cogvideox import Pipeline
from cogvideox.demo import world
from cogvideox.demo.build import judged_reconstructions


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--split", choices=("held_out", "train"), default="held_out")
    p.add_argument("--scenes", type=int, default=2, help="scenes per caption (scene i of caption k: rng [i, k])")
    p.add_argument("--batch", type=int, default=9)
    args = p.parse_args(argv)
    vae = Pipeline.from_pretrained(args.model).vae
    captions = world.captions_of(args.split)
    scenes = [world.scene_for_caption(c, np.random.default_rng([i, k]))
              for i in range(args.scenes) for k, c in enumerate(captions)]
    right = 0
    for scene, verdict in judged_reconstructions(vae, scenes, args.batch):
        if verdict.matches(scene.caption):
            right += 1
        else:
            print(f"read wrong: {scene.caption!r} -> {verdict.colour} {verdict.direction}")
    print(f"{args.split}: {right} of {len(scenes)} reconstructions read right ({100 * right / len(scenes):.1f}%)")


if __name__ == "__main__":
    main()

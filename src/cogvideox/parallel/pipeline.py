"""A `Pipeline` whose work is spread over the processes of a mesh.

    device = init_distributed()                        # under torchrun: joins the process group
    mesh = build_mesh(parse_layout("cfg=2,ulysses=2"), device)
    pipe = parallelize(Pipeline.from_pretrained("THUDM/CogVideoX-5b", device=device), mesh)
    out = pipe("a panda playing a guitar", seed=42)    # the same frames on every process
    if mesh.is_leader: export_video(out.frames[0], "panda.mp4", fps=8)

What is split, and how the result relates to one process:
- the T5 prompts: each process encodes some of them, a sum-reduction of zero-filled slots shares the
  states (adding zeros is exact);
- the transformer: CFG halves (`cfg.py`) and sequence shards (`sequence.py`), equal to one process up
  to the order of floating-point sums;
- the speed levers of `accelerate` (applied before): compiled blocks hold the collectives (the ring as
  one opaque operator), and the step cache decides for the whole group (`step_cache.py`);
- the VAE decode: by tiles (`decode.py`) when tiling is on, equal to the single-process tiled decode;
  with tiling off every process decodes the whole video untiled, as one process does (tiling is
  never turned on for the split: it changes the video at the seams).
Every process draws the same noise (rank 0's seed is broadcast when none is given) and runs the same
scheduler steps on the same gathered predictions, so all hold the same latents throughout.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
import torch.distributed as dist

from cogvideox.conditioning import ImageConditioned
from cogvideox.errors import InputError
from cogvideox.parallel.cfg import CFGParallel
from cogvideox.parallel.decode import split_decode
from cogvideox.parallel.mesh import Mesh, broadcast_int
from cogvideox.parallel.sequence import SequenceParallel
from cogvideox.parallel.step_cache import share_step_cache, unshare_step_cache
from cogvideox.pipeline import Pipeline


class ParallelPipeline(Pipeline):
    """`Pipeline` on a mesh: same call, same result, the work shared by the mesh's group.

    It shares the modules of the pipeline it was built from; `close()` takes the sequence hooks off
    the transformer again.
    """

    def __init__(self, pipe: Pipeline, mesh: Mesh) -> None:
        # A copy of `pipe`'s state (modules shared, not copied): its components were checked when it
        # was built, and whatever it carries besides (offloading, LoRA bookkeeping) comes along.
        self.__dict__.update(vars(pipe))
        mesh.layout.check(heads=self.transformer.config.num_attention_heads)
        self.mesh = mesh
        self._sequence = SequenceParallel(self.transformer, mesh)
        share_step_cache(self._step_cache, mesh, self._sequence)  # the group decides which steps skip
        self._prompt_turn = 0

    @property
    def _step_cache(self):
        return self.acceleration.cache if self.acceleration is not None else None

    def close(self) -> None:
        """Restore the transformer to its single-process form."""
        self._sequence.remove()
        unshare_step_cache(self._step_cache)

    def with_scheduler(self, scheduler) -> Pipeline:
        raise InputError("choose the scheduler before parallelize(): with_scheduler() on the plain pipeline")

    def accelerate(self, **kwargs) -> Pipeline:
        raise InputError("apply the speed levers before parallelize(): accelerate() on the plain pipeline")

    def __call__(self, prompt, negative_prompt=None, *, seed=None, generator=None, progress=True, **kwargs):
        """As `Pipeline.__call__`. Progress bars show on global rank 0 only (group 0's leader)."""
        if self.mesh.layout.cfg > 1 and kwargs.get("guidance_scale", 6.0) <= 1:
            raise InputError("cfg=2 splits the guidance batch, but guidance is off (scale <= 1); use cfg=1")
        if seed is None and generator is None:
            seed = broadcast_int(secrets.randbelow(2**32), self.mesh)  # one random seed for the group
        self._prompt_turn = 0
        return super().__call__(
            prompt,
            negative_prompt,
            seed=seed,
            generator=generator,
            progress=progress and self.mesh.is_leader and self.mesh.replica == 0,
            **kwargs,
        )

    def encode_prompts(self, prompts: list[str], max_sequence_length: int, videos_per_prompt: int = 1) -> torch.Tensor:
        """As `Pipeline.encode_prompts`, each prompt encoded by one process of the group.

        Prompts go round-robin, continuing across the calls of one generation (the prompts, then the
        negative prompts), so one prompt and its negative land on two different processes.
        """
        if self.mesh.group is None:
            return super().encode_prompts(prompts, max_sequence_length, videos_per_prompt)
        size = self.mesh.layout.size
        owners = [(self._prompt_turn + i) % size for i in range(len(prompts))]
        self._prompt_turn += len(prompts)
        mine = [i for i, owner in enumerate(owners) if owner == self.mesh.rank]
        width = self.text_encoder.d_model
        embeds = torch.zeros(len(prompts), max_sequence_length, width, device=self.device, dtype=self.dtype)
        if mine:
            embeds[mine] = super().encode_prompts([prompts[i] for i in mine], max_sequence_length)
        dist.all_reduce(embeds, group=self.mesh.group)  # each slot: one process's states + zeros
        return embeds.repeat_interleave(videos_per_prompt, dim=0)

    def decode(
        self, latents: torch.Tensor, progress: bool = False, padding_frames: int | None = None
    ) -> list[np.ndarray]:
        """As `Pipeline.decode`, with the VAE's tiles spread over the group when tiling is on (see
        `decode.split_decode`); untiled, every process decodes the whole video."""
        vae = self.vae
        self.vae = _TileSplitVAE(vae, self.mesh)  # what the inherited decode calls, for this call only
        try:
            return super().decode(latents, progress, padding_frames)
        finally:
            self.vae = vae

    def _start(self, request, generator, shape, picture=None, source=None, latents=None, last=None):
        latents, model, timesteps = super()._start(request, generator, shape, picture, source, latents, last)
        if self.mesh.layout.cfg > 1:
            if isinstance(model, ImageConditioned):
                model.transformer = CFGParallel(model.transformer, self.mesh)
            else:
                model = CFGParallel(model, self.mesh)
        return latents, model, timesteps


class _TileSplitVAE:
    """The VAE with `decode` spread over the mesh by tiles; everything else is the VAE's own."""

    def __init__(self, vae, mesh: Mesh) -> None:
        self._vae, self._mesh = vae, mesh

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return split_decode(self._vae, z, self._mesh)

    def __getattr__(self, name: str):
        return getattr(self._vae, name)


def parallelize(pipe: Pipeline, mesh: Mesh) -> ParallelPipeline:
    """`pipe` spread over `mesh`'s group (its modules shared, not copied). Every process of the group
    must build it from the same model and call it with the same arguments."""
    if isinstance(pipe, ParallelPipeline):
        raise InputError("this pipeline is already parallel")
    return ParallelPipeline(pipe, mesh)


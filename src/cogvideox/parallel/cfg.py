"""CFG parallelism: the two halves of the guidance batch [uncond ; cond] on two processes.

The halves never interact inside the transformer, so each process runs its half and one all-gather per
step brings the whole prediction back to both; the guidance combination and the scheduler step then run
identically on each, which keeps their latents equal. One all-gather of the output per step is the only
communication: [B, F, C, h, w] in the model dtype (5B at 49x480x720: 13*16*60*90*2 bytes = 2.2 MB).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cogvideox.parallel.mesh import Mesh


class CFGParallel:
    """The denoiser as the sampler sees it, with the batch split over the mesh's cfg group.

    Called like the transformer, with the arguments that carry the batch first and the others (`ofs`,
    `image_rotary_emb`: shared by the whole batch) by keyword, passed on as they are. A batch that does
    not split evenly (guidance off) runs whole on every process, which is correct, only not faster.
    """

    def __init__(self, transformer, mesh: Mesh) -> None:
        self.transformer = transformer
        self.mesh = mesh
        self.config = transformer.config

    def __call__(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        **shared,
    ) -> torch.Tensor:
        parts, index = self.mesh.layout.cfg, self.mesh.cfg_index
        batch = hidden_states.shape[0]
        if parts == 1 or batch % parts:
            return self.transformer(hidden_states, encoder_hidden_states, timestep, **shared)

        def mine(x):
            if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch:
                return x.chunk(parts)[index]
            return x  # a scalar timestep

        out = self.transformer(mine(hidden_states), mine(encoder_hidden_states), mine(timestep), **shared)
        out = out.contiguous()
        gathered = [torch.empty_like(out) for _ in range(parts)]
        dist.all_gather(gathered, out, group=self.mesh.cfg_group)
        return torch.cat(gathered)

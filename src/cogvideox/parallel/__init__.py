"""Several processes (GPUs) on one video: CFG, Ulysses and ring parallelism, applied from outside the model.

    torchrun --nproc-per-node 4 -m cogvideox generate "a panda" --parallel cfg=2,ulysses=2

`mesh.py` parses layouts and builds the process groups, `cfg.py` splits the guidance batch,
`sequence.py` (with `ring.py`) splits the token sequence, `decode.py` the VAE decode (by tiles, when
tiling is on), and `pipeline.py` puts them together behind the `Pipeline` call. docs/parallel.md has
the communication arithmetic and says what equals what.
"""

from cogvideox.parallel.mesh import (
    Layout,
    Mesh,
    build_mesh,
    init_distributed,
    launched_distributed,
    parse_layout,
    single_process_mesh,
)
from cogvideox.parallel.pipeline import ParallelPipeline, parallelize

__all__ = [
    "Layout",
    "Mesh",
    "ParallelPipeline",
    "build_mesh",
    "init_distributed",
    "launched_distributed",
    "parallelize",
    "parse_layout",
    "single_process_mesh",
]

"""The story world's build: a program on top of the world (``pipelines.world``).

``python -m pipelines.world_build build`` trains the world's models stage by stage
(:mod:`.build`: ``train_base`` the VAE and base, ``python -m pipelines.train`` for GSA and DPO
as child processes, ``train_sdxl`` the SDXL family), makes the preference data through
``python -m pipelines.candidates`` and a studio in a child process (:mod:`.studio_child`),
labelled by the pixel reader (:mod:`.label`), and exports the weights the world ships.
:mod:`.sample` draws world frames with those weights (the benchmarks use it too).  No
program imports this package.
"""

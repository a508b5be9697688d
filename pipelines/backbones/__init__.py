"""The drawing backbones shared by the programs that draw frames (Story-Iter, candidate
sets, the quality benchmark): ``sdxl`` (SDXL + IP-Adapter, GRCA references), ``flux``
(FLUX + GSA replaying a reference cache), ``flux2`` (FLUX.2 [klein] + GSA, the same rounds
on a pool of references each recorded alone), and ``sampling``, the scheduler and VAE
options they all take.  A backbone loads a local pipeline folder, opens a round on its
references and draws batches of frames; it knows nothing of run folders or command lines.
"""

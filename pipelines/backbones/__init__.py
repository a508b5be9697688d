"""The two drawing backbones shared by the programs that draw frames (Story-Iter, candidate
sets, the quality benchmark): ``sdxl`` (SDXL + IP-Adapter, GRCA references) and ``flux``
(FLUX + GSA replaying a reference cache), and ``sampling``, the scheduler and VAE options
both take.  A backbone loads a local pipeline folder, opens a round on its references and
draws batches of frames; it knows nothing of run folders or command lines.
"""

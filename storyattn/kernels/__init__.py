"""Triton kernels of storyattn (installed as ``storyattn.kernels``).

Launch code only: each submodule holds private ``@triton.jit`` kernels and the
plain python launchers that allocate outputs and pick block sizes.  Nothing is
imported here on purpose, so ``import storyattn.kernels`` never needs triton and
never touches a GPU; import the submodule you need (for example
``storyattn.kernels.segment_attn``) when you are about to launch it.
"""

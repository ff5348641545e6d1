"""The kernels behind CRReLU and EAFOActivation, and how a call picks one.

An eager call of either module goes, in this order:

1. ``DYNACT_KERNELS`` (read once into :data:`dispatch.MODE`): ``"reference"`` skips the fused
   kernels, ``"ops"`` runs plain tensor ops as under ``torch.compile``; ``"auto"`` (default) goes on.
2. Under ``torch.jit.trace``, a ``torch.func`` transform or forward-mode AD
   (:func:`dispatch.plain_ops_needed`): plain tensor ops, which those can trace and differentiate.
3. CPU: the C++ kernel (source in :mod:`.cpu`), compiled on first use and cached under
   ``$DYNACT_CACHE``. CUDA: the Triton kernels of :mod:`.cuda`, if Triton is installed. The
   output keeps a dense input's memory layout (channels_last stays channels_last).
4. Otherwise (no compiler, a failed build, no Triton; one warning says why): the reference path,
   the hand-written autograd functions of :mod:`.reference` and :mod:`dynact.activations`.

Under ``torch.compile`` the graph calls the C++ kernels as custom ops on CPU and holds plain
tensor ops (fused by Inductor) on CUDA. :mod:`.dispatch` holds the choice, the build and the
calls; nothing here is public API.
"""

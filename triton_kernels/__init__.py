"""Triton kernels of qlora_kernels, installed as ``qlora_kernels.triton_kernels``.

One module per kernel family: ``@triton.jit`` kernels, their config function and their launcher (checks, allocates,
launches). No autograd and no nn.Module here: that is ``qlora_kernels.ops``' job.
"""

"""The kernel boundary. Each op (flash, linear, scoring, block_target) chooses its implementation once
(Triton kernels, their PyTorch twins in torch_impl/, or fla), owns its autograd.Function and has one
signature that every implementation follows. Methods call ops; only ops look at backend names
(`dispatch.resolve` turns a requested backend into the one that runs). Ops import neither the
registry nor the API.
"""

"""Verification against the real runtimes (megatron-core on CPU): the conversion certificate.

Nothing here is imported by the rest of the package; `megatron_cpu.apply_cpu_shims` patches
torch process-wide and runs only inside the certificate's worker processes.
"""

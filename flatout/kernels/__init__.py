"""The ops flatout's layers run: Triton kernels for CUDA (one module per op family: norm.py,
rotary.py, activation.py, kv_cache.py, prefill_attention.py, decode_attention.py, allreduce.py,
top_k_top_p.py), their pure-PyTorch references (reference.py), and the choice between them
(ops.py).

Importing this package, reference.py or ops.py does not import triton; the kernel modules do. On
CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before they are
imported), which the kernel tests use."""

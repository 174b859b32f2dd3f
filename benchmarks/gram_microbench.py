"""Micro-benchmark: full `xᵀx` vs the upper-block-triangle accumulation of `SymmetricGram`'s scheme (8192 × 1536, one thread).

    python benchmarks/gram_microbench.py

Used for the "39% less time" figure in docs/sparsellm.md "Speed".
"""
import torch, time
torch.set_num_threads(1)
x = torch.randn(8192, 1536)
H = torch.zeros(1536, 1536)
def full():
    H.addmm_(x.t(), x)
def blocked(k):
    f = x.shape[1]; e = [f * i // k for i in range(k + 1)]
    for i in range(k):
        xi = x[:, e[i]:e[i+1]]
        H[e[i]:e[i+1], e[i]:].addmm_(xi.t(), x[:, e[i]:])
for name, fn in [("full", full), ("b2", lambda: blocked(2)), ("b4", lambda: blocked(4)), ("b8", lambda: blocked(8))]:
    fn(); t = time.process_time()
    for _ in range(5): fn()
    print(name, (time.process_time() - t) / 5)

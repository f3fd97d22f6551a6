"""fwd+bwd throughput of the ops on CPU: step-loop reference vs chunked, and how chunked time grows with T.

Shapes follow model_anchors.md §3.4: wkv6 H=4, K=V=64; ssd H=8, P=64, N=64 (G=1). Timings are the best of a
few repeats of forward + backward of (out.sum() + final_state.sum()) with a nonzero initial state.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from groundthink.ops import ssd_chunked, ssd_reference, wkv6_chunked, wkv6_reference


def wkv6_inputs(B, T, H=4, K=64, V=64):
    g = torch.Generator().manual_seed(0)
    r, k = (torch.randn(B, T, H, K, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g)
    log_w = -torch.exp(torch.randn(B, T, H, K, generator=g) - 2)
    return [r, 0.1 * k, v, log_w, torch.randn(H, K, generator=g), torch.randn(B, H, K, V, generator=g)]


def ssd_inputs(B, T, H=8, P=64, G=1, N=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, P, generator=g)
    dt = F.softplus(torch.randn(B, T, H, generator=g))
    A = -(0.1 + 3 * torch.rand(H, generator=g))
    Bm, Cm = (torch.randn(B, T, G, N, generator=g) for _ in range(2))
    return [x, dt, A, Bm, Cm, torch.randn(B, H, P, N, generator=g)]


def time_fwd_bwd(fn, inputs, repeats=3) -> float:
    """Best wall time in seconds of one forward + backward (after one warm-up)."""
    inputs = [t.requires_grad_() for t in inputs]
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out, state = fn(*inputs)
        (out.sum() + state.sum()).backward()
        best = min(best, time.perf_counter() - start)
        for t in inputs:
            t.grad = None
    return best


OPS = {
    "wkv6": (wkv6_inputs, wkv6_reference, wkv6_chunked),
    "ssd": (ssd_inputs, ssd_reference, ssd_chunked),
}


def main(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    shapes = [(4, 64), (2, 256)] if quick else [(8, 256), (4, 1024)]
    lengths = [128, 256, 512] if quick else [512, 1024, 2048, 4096]
    results = {}
    print(f"ops fwd+bwd, fp32, {torch.get_num_threads()} threads (ktok/s = thousand tokens per second)")
    header = ["op".ljust(6), "B".rjust(3), "T".rjust(5), "reference ms".rjust(13), "ktok/s".rjust(8)]
    print(" ".join(header + ["chunked ms".rjust(11), "ktok/s".rjust(8), "speedup".rjust(8)]))
    for name, (make, reference, chunked) in OPS.items():
        for B, T in shapes:
            ref_s = time_fwd_bwd(reference, make(B, T), repeats=1)
            chk_s = time_fwd_bwd(chunked, make(B, T))
            tokens = B * T
            results[(name, B, T)] = (ref_s, chk_s)
            print(
                f"{name:6} {B:>3} {T:>5} {ref_s * 1e3:>13.1f} {tokens / ref_s / 1e3:>8.1f} "
                f"{chk_s * 1e3:>11.1f} {tokens / chk_s / 1e3:>8.1f} {ref_s / chk_s:>7.1f}x"
            )
    print("\nchunked time vs T (B=1)")
    for name, (make, _, chunked) in OPS.items():
        times = {T: time_fwd_bwd(chunked, make(1, T)) for T in lengths}
        row = "  ".join(f"T={T}: {s * 1e3:.1f} ms" for T, s in times.items())
        ratio = times[lengths[-1]] / times[lengths[0]]
        results[(name, "scaling")] = ratio
        print(f"{name:6} {row}  time({lengths[-1]})/time({lengths[0]}) = {ratio:.2f}")
    return results


if __name__ == "__main__":
    main()

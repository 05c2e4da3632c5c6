"""How to run the M SWAG passes: one torch.vmap over functional_call vs a Python loop.

`python -m bench.swag_passes [--threads N]` prints JSON: median milliseconds per batch for
each method, network (the demo PLE-MLP and a PLE-Transformer) and batch size, with the
ratio loop/vmap (> 1 means vmap is faster). Sizes follow the synthetic world (76 numeric +
32 categorical features). The load average is printed too: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from model.ple import MultiTaskNet, NetConfig, count_parameters
from model.swag import SWAG, _forward_loop, _forward_vmap

CARDS = (9, 8, 8, 1002, 1002, 50, 402, 6, 9, 9, 7, 36, 5, 82, 7, 10, 14, 4, 7, 22, 1002, 10, 7,
         802, 802, 802, 802, 12, 1002, 52, 5, 302)
NETS = {
    "PLE-MLP (demo)": dict(expert="mlp", d_token=4, expert_dim=32, mlp_hidden=64, tower_hidden=16),
    "PLE-Transformer": dict(expert="transformer", d_token=8, expert_dim=32, mlp_hidden=64,
                            tower_hidden=16, n_latents=8),
}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (vmap traces on first use)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--samples", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name, kw in NETS.items():
        net = MultiTaskNet(NetConfig(n_num=76, cardinalities=CARDS, **kw)).eval()
        swag = SWAG(count_parameters(net), max_rank=12)
        base = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
        for _ in range(12):
            swag.collect(base + 0.01 * torch.randn_like(base))
        weights = swag.sample(args.samples, generator=torch.Generator().manual_seed(0))
        for batch in (512, 4096):
            x = torch.randn(batch, 152)
            idx = torch.randint(0, 5, (batch, 32))
            with torch.no_grad():
                ms = {m: _time(lambda f=f, a=(net, weights, x, idx): f(*a), args.repeats)
                      for m, f in (("vmap", _forward_vmap), ("loop", _forward_loop))}
            results.append({"net": name, "batch": batch, "samples": args.samples,
                            "vmap_ms": round(ms["vmap"], 1), "loop_ms": round(ms["loop"], 1),
                            "loop_over_vmap": round(ms["loop"] / ms["vmap"], 2)})
    print(json.dumps({"threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()

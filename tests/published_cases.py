"""Published comparisons of CP configurations on stated hardware, for ``mindspeed-cp plan``'s cost model.

Each case: its source, the device preset it maps to, the attention shape, the pass (forward only or forward +
backward), and the published throughput of each configuration (iterations/s, higher is better; ``UxRy`` =
Ulysses degree x, ring degree y; the zigzag ring implementation, the one ours is). ``reproduced`` records what
the model does with it today and ``why`` explains a miss; ``tests/test_plan.py`` asserts both, so this file
cannot drift from the model (docs/planner.md shows the table).

Comparison rule: every pair of configurations whose published throughputs differ by at least ``GAP`` (5 %,
the run-to-run spread the sources themselves show for identical settings) must come out in the published
order; pairs closer than that are not judged.
"""

from __future__ import annotations

K = 1024
GAP = 1.05

USP = "https://github.com/feifeibear/long-context-attention"
CASES = [
    dict(
        id="C01a",
        source=f"{USP} README, media/benchmark_results.png (zigzag, qkvpacked)",
        device="a100",
        world=8,
        S=8 * K,
        heads=32,
        kv_heads=32,
        head_dim=32,
        batch=2,
        forward_only=True,
        published={"U8R1": 237.874, "U4R2": 581.26, "U2R4": 417.267, "U1R8": 245.756},
        reproduced=False,
        why="the model ranks U8R1 first (one all-to-all of 1 MiB per rank on NVLink costs it ~0.1 ms of 0.3 ms); "
        "the published U8R1 runs at 41 % of U4R2 - at 8k tokens the measurement is dominated by per-call "
        "costs (yunchang's Python-level all-to-all reshapes, three separate calls) the model does not have",
    ),
    dict(
        id="C01c",
        source=f"{USP} README, media/benchmark_results.png (zigzag, qkvpacked)",
        device="a100",
        world=8,
        S=128 * K,
        heads=32,
        kv_heads=32,
        head_dim=32,
        batch=2,
        forward_only=True,
        published={"U8R1": 15.895, "U4R2": 16.027, "U2R4": 15.305, "U1R8": 13.169},
        reproduced=True,
    ),
    dict(
        id="C01e",
        source=f"{USP} README, media/benchmark_results.png (GQA 64/8, zigzag)",
        device="a100",
        world=8,
        S=128 * K,
        heads=64,
        kv_heads=8,
        head_dim=32,
        batch=2,
        forward_only=True,
        published={"U8R1": 8.37, "U4R2": 8.054, "U2R4": 8.038, "U1R8": 7.819},
        reproduced=True,
    ),
    dict(
        id="C01h",
        source=f"{USP} README, media/benchmark_results.png (zigzag, qkvpacked)",
        device="a100",
        world=8,
        S=128 * K,
        heads=8,
        kv_heads=8,
        head_dim=128,
        batch=2,
        forward_only=True,
        published={"U8R1": 20.992, "U4R2": 21.916, "U2R4": 21.383, "U1R8": 18.211},
        reproduced=True,
    ),
    dict(
        id="C03a",
        source=f"{USP} README, media/pcie_machine.jpg (8 x L20, zigzag, no packing)",
        device="l20",
        world=8,
        S=128 * K,
        heads=32,
        kv_heads=32,
        head_dim=32,
        batch=2,
        forward_only=True,
        published={"U8R1": 3.947, "U4R2": 6.667, "U2R4": 8.471, "U1R8": 7.408},
        reproduced=True,
    ),
    dict(
        id="C03b",
        source=f"{USP} README, media/pcie_machine.jpg (8 x L20, GQA 32/8, zigzag)",
        device="l20",
        world=8,
        S=32 * K,
        heads=32,
        kv_heads=8,
        head_dim=128,
        batch=1,
        forward_only=True,
        published={"U8R1": 14.262, "U4R2": 32.818, "U2R4": 62.754, "U1R8": 58.377},
        reproduced=False,
        why="5 of 6 pairs right; U2R4 over U1R8 (7 % published) comes out 3 % the other way: the model lets U1R8's "
        "8-step ring hide its cross-switch hops and charges U2R4's pair all-to-all in full - the socket level "
        "that makes cross-switch traffic slow in this server is not in the model (see C03d)",
    ),
    dict(
        id="C03d",
        source=f"{USP} README, media/pcie_machine.jpg (8 x L20, GQA 32/8, zigzag)",
        device="l20",
        world=8,
        S=8 * K,
        heads=32,
        kv_heads=8,
        head_dim=128,
        batch=1,
        forward_only=True,
        published={"U8R1": 57.098, "U4R2": 152.189, "U2R4": 454.93, "U1R8": 361.969},
        reproduced=False,
        why="the published spread is 8x (U8R1 17.5 ms vs U2R4 2.2 ms): all-to-alls that cross the CPU sockets run "
        "at ~1 GB/s while ring hops between switches of one socket stay fast; the model has two link classes "
        "(a switch pair, everything else) and puts U4R2's all-to-all and U1R8's ring hops in the same class",
    ),
    dict(
        id="C04",
        source=f"{USP} README@b93c30e 'Case Study' (heads 8, zigzag)",
        device="a100",
        world=8,
        S=64 * K,
        heads=8,
        kv_heads=8,
        head_dim=128,
        batch=2,
        forward_only=False,
        published={"U8R1": 10.679, "U4R2": 12.864, "U2R4": 11.024, "U1R8": 8.211},
        reproduced=False,
        why="U4R2 beats U8R1 by 20 % there; in the model U8R1's all-to-all is 1 ms of 39 ms (NVLink) and the two "
        "tie - the gap is not a bandwidth effect (same as C01a)",
    ),
    dict(
        id="C05",
        source=f"{USP} README@b93c30e (heads 2, zigzag; Ulysses <= 2)",
        device="a100",
        world=8,
        S=64 * K,
        heads=2,
        kv_heads=2,
        head_dim=128,
        batch=2,
        forward_only=False,
        published={"U2R4": 38.337, "U1R8": 32.095},
        reproduced=True,
    ),
    dict(
        id="C06",
        source=f"{USP} README@b93c30e (GQA 64/8, zigzag, scripts/run_gqa.sh)",
        device="a100",
        world=8,
        S=32 * K,
        heads=64,
        kv_heads=8,
        head_dim=128,
        batch=2,
        forward_only=False,
        published={"U8R1": 11.428, "U4R2": 11.299, "U2R4": 10.638, "U1R8": 9.64},
        reproduced=True,
    ),
]


def degrees(label: str):
    """``"U4R2"`` -> (4, 2)."""
    u, r = label[1:].split("R")
    return int(u), int(r)

"""Replay the HPDC 2008 workload's image mix through per-node image caches; print hit rates and bytes.

Trace: shared/traces/hpdc08/30days.swf (5,545 batch jobs, one "processor" = one node of 144). Each job
needs one of 37 images of 4 GB, drawn uniformly or skewed (7 images at 10 %, 30 at 1 %), as in the
paper; each node caches 20 GB (5 images). Jobs are placed FCFS on the nodes that free up first, either
ignoring caches or preferring, among those equally early nodes, the ones holding the image (what
vmwrap's node features + prefer do). Policies: LRU (vmwrap's), LFU, FIFO.

usage: python benchmarks/cache_policies.py [--trace PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from collections import OrderedDict
from pathlib import Path

NODES, IMAGE_GB, CACHE_GB = 144, 4, 20
SLOTS = CACHE_GB // IMAGE_GB
TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "hpdc08" / "30days.swf"


def read_swf(path: Path) -> list[tuple[float, float, int]]:
    jobs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith(";"):
            continue
        f = line.split()
        if len(f) < 18:
            raise SystemExit(f"{path}:{lineno}: expected 18 SWF fields, got {len(f)}")
        submit, run, procs = float(f[1]), float(f[3]), int(f[7])
        if run >= 0 and procs > 0:
            jobs.append((submit, run, min(procs, NODES)))
    return jobs


def images_for(n: int, mix: str, rng: random.Random) -> list[int]:
    if mix == "uniform":
        return [rng.randrange(37) for _ in range(n)]
    weights = [10] * 7 + [1] * 30  # 7 x 10 % + 30 x 1 %
    return rng.choices(range(37), weights=weights, k=n)


class NodeCache:
    def __init__(self, policy: str):
        self.policy = policy
        self.items: OrderedDict[int, int] = OrderedDict()  # image -> use count; order = recency/insertion

    def has(self, img: int) -> bool:
        return img in self.items

    def use(self, img: int) -> bool:
        if img in self.items:
            self.items[img] += 1
            if self.policy == "LRU":
                self.items.move_to_end(img)
            return True
        if len(self.items) >= SLOTS:
            if self.policy == "LFU":
                victim = min(self.items, key=lambda k: self.items[k])  # ties: oldest first
            else:  # LRU: least recent; FIFO: oldest inserted
                victim = next(iter(self.items))
            del self.items[victim]
        self.items[img] = 1
        return False


def replay(jobs, imgs, policy: str, aware: bool) -> tuple[int, int]:
    caches = [NodeCache(policy) for _ in range(NODES)]
    free = [(0.0, n) for n in range(NODES)]  # (time the node frees up, node)
    heapq.heapify(free)
    hits = misses = 0
    for (submit, run, procs), img in zip(jobs, imgs):
        taken = [heapq.heappop(free) for _ in range(procs)]
        start = max(submit, taken[-1][0])
        if aware:  # swap in equally early nodes that hold the image
            ready = [t for t in free if t[0] <= start]
            holders = [t for t in ready if caches[t[1]].has(img)]
            cold = [i for i, t in enumerate(taken) if not caches[t[1]].has(img)]
            for i, h in zip(cold, holders):
                free.remove(h)
                free.append(taken[i])
                taken[i] = h
            heapq.heapify(free)
        for _, n in taken:
            if caches[n].use(img):
                hits += 1
            else:
                misses += 1
            heapq.heappush(free, (start + run, n))
    return hits, misses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--seed", type=int, default=2008)
    a = ap.parse_args()
    jobs = sorted(read_swf(a.trace))
    t0 = time.perf_counter()
    print(f"{len(jobs)} jobs, {NODES} nodes, {SLOTS} images of {IMAGE_GB} GB per node cache")
    print(f"{'mix':<8} {'placement':<12} {'policy':<5} {'hit rate':>9} {'GB moved':>9} {'vs LRU':>7}")
    for mix in ("uniform", "skewed"):
        imgs = images_for(len(jobs), mix, random.Random(a.seed))
        for aware in (False, True):
            base = None
            for policy in ("LRU", "LFU", "FIFO"):
                h, m = replay(jobs, imgs, policy, aware)
                gb = m * IMAGE_GB
                base = base or gb
                print(f"{mix:<8} {'cache-aware' if aware else 'oblivious':<12} {policy:<5} {h / (h + m):9.1%} "
                      f"{gb:9,d} {gb / base:7.2f}")
    print(f"(replayed in {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What p99 any dispatcher can reach on the sweep's heavy-tailed cluster (issue 17).

A model, not a measurement: three first-in-first-out servers running at 0.1, 0.2 and
0.4 of a CPU (the containers' quotas as a steady share, no CFS periods), each request
costing CPU drawn as the test service draws it (Pareto, shape 1.5, mean 2 ms, capped at
50x the mean), requests arriving at a constant rate (the experiment's open loop) at a
share `rho` of what the quotas allow. p50/p99 of the time from arrival to answer, for:

- oracle: sends each request where it would finish first, knowing its cost and every
  queued request's (no real balancer knows either);
- first-free: sends each request to the server that frees up first (knows queued work,
  not the new request's cost);
- least-request: fewest requests in flight per unit of speed (what a balancer sees);
- weighted-rr: rotation 4:2:1 by the quotas (static weights at the true capacities).

`--saturation` instead models the experiment's saturation measurement: how far above
the true throughput a closed-loop sample of N requests' mean cost puts it, alone, as
the best of five schedulers' samples, and as the best of five medians of three.

Usage: python3 docs/bench/heavy-tailed-dispatch.py [--saturation] [SEED ...]
(default seeds 1 2 3)
"""
import collections
import random
import sys

SPEEDS = [0.1, 0.2, 0.4]
SHAPE, MEAN_MS, CAP = 1.5, 2.0, 50.0
XM = MEAN_MS * (SHAPE - 1) / SHAPE
# E[min(X, c)] of a Pareto X: the uncapped mean less what the cap cuts off.
CAPPED_MEAN_MS = MEAN_MS - XM**SHAPE * (CAP * MEAN_MS) ** (1 - SHAPE) / (SHAPE - 1)
REQUESTS = 200_000


def cost(rng):
    return min(XM / (1 - rng.random()) ** (1 / SHAPE), CAP * MEAN_MS)


def run(policy, rho, rng):
    rate = rho * sum(SPEEDS) / CAPPED_MEAN_MS  # requests per ms
    free = [0.0] * 3  # when each server has finished what it holds
    answers = [collections.deque() for _ in SPEEDS]  # finish times of requests held
    rotation = [2, 1, 2, 0, 2, 1, 2]
    latencies = []
    for k in range(REQUESTS):
        now, c = k / rate, cost(rng)
        for held in answers:
            while held and held[0] <= now:
                held.popleft()
        servers = range(len(SPEEDS))
        if policy == "oracle":
            i = min(servers, key=lambda i: max(free[i], now) + c / SPEEDS[i])
        elif policy == "first-free":
            i = min(servers, key=lambda i: (max(free[i], now), -SPEEDS[i]))
        elif policy == "least-request":
            i = min(servers, key=lambda i: ((len(answers[i]) + 1) / SPEEDS[i], -SPEEDS[i]))
        else:
            i = rotation[k % len(rotation)]
        free[i] = max(free[i], now) + c / SPEEDS[i]
        answers[i].append(free[i])
        latencies.append(free[i] - now)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]


def saturation(seed):
    """Relative error of a throughput taken from the mean cost of a sample."""
    rng = random.Random(seed)
    squares = sum(cost(rng) ** 2 for _ in range(REQUESTS)) / REQUESTS
    sd = (squares - CAPPED_MEAN_MS**2) ** 0.5
    print(f"capped mean {CAPPED_MEAN_MS:.4f} ms, standard deviation {sd / CAPPED_MEAN_MS:.2f}x the mean")
    # Requests a 0.7-CPU cluster finishes in 5 s and 10 s at the capped mean cost.
    per_second = sum(SPEEDS) / CAPPED_MEAN_MS * 1000

    def sample(seconds):
        n = int(per_second * seconds)
        return CAPPED_MEAN_MS / (sum(cost(rng) for _ in range(n)) / n)

    def median(v):
        return sorted(v)[len(v) // 2]

    trials = 300
    print("| sample | one sample's error (1 sd) | best of 5 (median) | best of 5 medians of 3 (median) |")
    print("|---|---|---|---|")
    for seconds in (5, 10, 20):
        one = [sample(seconds) for _ in range(trials)]
        spread = (sum((x - 1) ** 2 for x in one) / trials) ** 0.5
        best = median([max(sample(seconds) for _ in range(5)) for _ in range(trials)])
        best_median = median(
            [max(median([sample(seconds) for _ in range(3)]) for _ in range(5)) for _ in range(trials)]
        )
        print(f"| {seconds} s | ±{spread:.1%} | +{best - 1:.1%} | +{best_median - 1:.1%} |")


def main():
    args = sys.argv[1:]
    if args and args[0] == "--saturation":
        saturation(int(args[1]) if len(args) > 1 else 1)
        return
    seeds = [int(s) for s in args] or [1, 2, 3]
    print("| load | dispatcher | p99 ms per seed (p50 in brackets) |")
    print("|---|---|---|")
    for rho in (0.85, 0.9, 0.95, 1.0):
        for policy in ("oracle", "first-free", "least-request", "weighted-rr"):
            cells = []
            for seed in seeds:
                p50, p99 = run(policy, rho, random.Random(seed))
                cells.append(f"{p99:.0f} ({p50:.0f})")
            print(f"| {rho:.0%} | {policy} | {' · '.join(cells)} |")


if __name__ == "__main__":
    main()

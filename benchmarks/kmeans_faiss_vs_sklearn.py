"""k-means with faiss (what `raytrain_ssl.clustering` uses) against scikit-learn, on the same features.

    python benchmarks/kmeans_faiss_vs_sklearn.py [--n 100000] [--dim 256] [--k 1000] [--niter 20] [--threads N]

The features are DeepCluster-like: a mixture of `--k` overlapping Gaussian blobs, L2-normalised rows (as
`pca_whiten` outputs). Both libraries start from the same k initial centroids (k random rows), run the same number of
Lloyd iterations (assign every point, recompute every centroid) with the same number of threads, on float32.

The comparable scikit-learn setting is KMeans(n_init=1, algorithm="lloyd", max_iter=niter, tol=0,
init=<the shared centroids>): one run, plain Lloyd (not Elkan), no early stop on centre shift. sklearn can
still stop before max_iter if the labels stop changing (reported as its n_iter). faiss runs with
max_points_per_centroid=n so that it trains on every point, as DeepCluster does (its default subsamples to
256 points per centroid). The two handle a cluster that empties differently (faiss splits a big one, sklearn
moves the centre to a far point), so their inertias differ slightly even from the same start.

Reported per method: wall time of the fit (the fastest of --repeats), time per iteration, and the inertia
(sum of squared distances of every point to its nearest final centroid, computed the same way for both). A
third line times `raytrain_ssl.clustering.kmeans` (faiss from its own random start, plus the final assignment
and the empty-cluster re-split), to show what the wrapper adds. On a shared machine the timings move with
the load: the first line prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from raytrain_ssl.clustering import kmeans


def make_features(n: int, dim: int, num_blobs: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_blobs, dim)).astype(np.float32)
    features = centres[rng.integers(num_blobs, size=n)] + rng.normal(scale=noise, size=(n, dim)).astype(np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def warm_up(dim: int) -> None:
    """Start the OpenMP / BLAS thread pools of both libraries outside the timed runs."""
    x = np.random.default_rng(0).normal(size=(2000, dim)).astype(np.float32)
    faiss.Kmeans(dim, 10, niter=2, min_points_per_centroid=1).train(x)
    KMeans(n_clusters=10, init="random", n_init=1, algorithm="lloyd", max_iter=2, tol=0.0).fit(x)


def nearest_inertia(features: np.ndarray, centroids: np.ndarray) -> float:
    index = faiss.IndexFlatL2(features.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, _ = index.search(features, 1)
    return float(distances.astype(np.float64).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="number of points")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension (DeepCluster's PCA: 256)")
    parser.add_argument("--k", type=int, default=1000, help="number of clusters")
    parser.add_argument("--niter", type=int, default=20, help="Lloyd iterations for both (DeepCluster: 20)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OpenMP/BLAS threads for both")
    parser.add_argument("--noise", type=float, default=1.0,
                        help="blob noise relative to the spread of the centres; large = overlapping blobs, "
                        "which keeps sklearn from converging (and stopping) before niter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="time each fit this many times, report the fastest")
    parser.add_argument("--skip-sklearn", action="store_true", help="faiss only (sklearn is the slow one)")
    args = parser.parse_args()

    features = make_features(args.n, args.dim, args.k, args.noise, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    init_centroids = features[rng.choice(args.n, size=args.k, replace=False)].copy()
    faiss.omp_set_num_threads(args.threads)
    print(f"n={args.n} dim={args.dim} k={args.k} niter={args.niter} threads={args.threads} "
          f"faiss={faiss.__version__} load average={os.getloadavg()[0]:.1f}", flush=True)

    results = {}
    with threadpool_limits(limits=args.threads):
        warm_up(args.dim)
        seconds = float("inf")
        for _ in range(args.repeats):
            clustering = faiss.Kmeans(
                args.dim, args.k, niter=args.niter, seed=args.seed, verbose=False,
                max_points_per_centroid=args.n, min_points_per_centroid=1,
            )
            start = time.perf_counter()
            clustering.train(features, init_centroids=init_centroids)
            seconds = min(seconds, time.perf_counter() - start)
        results["faiss"] = {"seconds": seconds, "niter": args.niter, "seconds_per_iter": seconds / args.niter,
                            "inertia": nearest_inertia(features, clustering.centroids)}
        print(json.dumps({"method": "faiss.Kmeans", **results["faiss"]}), flush=True)

        seconds = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            wrapped = kmeans(features, args.k, niter=args.niter, seed=args.seed, use_gpu=False)
            seconds = min(seconds, time.perf_counter() - start)
        print(json.dumps({"method": "raytrain_ssl.clustering.kmeans", "seconds": seconds,
                          "inertia": wrapped.inertia, "niter": args.niter, "num_resplit": wrapped.num_resplit}),
              flush=True)

        if not args.skip_sklearn:
            seconds = float("inf")
            for _ in range(args.repeats):
                sk = KMeans(n_clusters=args.k, init=init_centroids, n_init=1, algorithm="lloyd",
                            max_iter=args.niter, tol=0.0, random_state=args.seed)
                start = time.perf_counter()
                sk.fit(features)
                seconds = min(seconds, time.perf_counter() - start)
            results["sklearn"] = {"seconds": seconds, "niter": int(sk.n_iter_),
                                  "seconds_per_iter": seconds / sk.n_iter_,
                                  "inertia": nearest_inertia(features, sk.cluster_centers_)}
            print(json.dumps({"method": "sklearn.KMeans(lloyd)", **results["sklearn"],
                              "sklearn_inertia_": float(sk.inertia_)}), flush=True)

    if "sklearn" in results:
        faiss_run, sk_run = results["faiss"], results["sklearn"]
        if sk_run["niter"] != faiss_run["niter"]:
            print(f"note: sklearn stopped after {sk_run['niter']} iterations (labels stable); compare seconds_per_iter")
        print(f"sklearn / faiss time: {sk_run['seconds'] / faiss_run['seconds']:.2f}x "
              f"(per iteration {sk_run['seconds_per_iter'] / faiss_run['seconds_per_iter']:.2f}x)   "
              f"inertia faiss {faiss_run['inertia']:.2f}, sklearn {sk_run['inertia']:.2f} "
              f"(sklearn / faiss {sk_run['inertia'] / faiss_run['inertia']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""k-means with faiss (what `raytrain_ssl.clustering` uses) against scikit-learn, on the same features.

    python benchmarks/kmeans_faiss_vs_sklearn.py [--n 100000] [--dim 256] [--k 1000] [--niter 20] [--threads N]

The features are DeepCluster-like: L2-normalised rows (as `pca_whiten` outputs) from a mixture of k/10
Gaussian blobs, i.e. k over-clusters the "classes" tenfold as DeepCluster does (k=10,000 on ImageNet's 1,000);
on cleanly separated data with one blob per cluster sklearn's Lloyd would stop after a few iterations. Both
libraries start from the same k initial centroids (k random rows), run the same number of Lloyd iterations
(assign every point, recompute every centroid) with the same number of threads, on float32.

The comparable scikit-learn setting is KMeans(n_init=1, algorithm="lloyd", max_iter=niter, tol=0,
init=<the shared centroids>): one run, plain Lloyd (not Elkan), no early stop on centre shift. sklearn can
still stop before max_iter if the labels stop changing (reported as its n_iter). faiss runs with
max_points_per_centroid=n so that it trains on every point, as DeepCluster does (its default subsamples to
256 points per centroid). The two handle a cluster that empties differently (faiss splits a big one, sklearn
moves the centre to a far point), so their inertias differ slightly even from the same start.

Reported per method: wall time of the fit (the fastest of --repeats; all_seconds lists every round), time
per iteration, and the inertia (sum of squared distances of every point to its nearest final centroid,
computed the same way for both). A third line times `raytrain_ssl.clustering.kmeans` (faiss from its own
random start, plus the final assignment and the empty-cluster re-split), to show what the wrapper adds. On a
shared machine the timings move with the load: the first line prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np
import sklearn
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


def fit_faiss(features: np.ndarray, init_centroids: np.ndarray, niter: int, seed: int) -> tuple[np.ndarray, int]:
    k, dim = init_centroids.shape
    clustering = faiss.Kmeans(
        dim, k, niter=niter, seed=seed, verbose=False, max_points_per_centroid=len(features), min_points_per_centroid=1
    )
    clustering.train(features, init_centroids=init_centroids)
    return clustering.centroids, niter


def fit_sklearn(features: np.ndarray, init_centroids: np.ndarray, niter: int, seed: int) -> tuple[np.ndarray, int]:
    # The comparable setting: one run from the given centroids, plain Lloyd, no tolerance-based stop.
    model = KMeans(
        n_clusters=len(init_centroids), init=init_centroids, n_init=1, algorithm="lloyd", max_iter=niter, tol=0.0,
        random_state=seed,
    )
    model.fit(features)
    return model.cluster_centers_, int(model.n_iter_)


def fit_wrapper(features: np.ndarray, init_centroids: np.ndarray, niter: int, seed: int) -> tuple[np.ndarray, int]:
    result = kmeans(features, len(init_centroids), niter=niter, seed=seed, use_gpu=False)  # its own random start
    return result.centroids, niter


METHODS = {
    "faiss.Kmeans": fit_faiss,
    "raytrain_ssl.clustering.kmeans": fit_wrapper,
    "sklearn.KMeans(lloyd)": fit_sklearn,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="number of points")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension (DeepCluster's PCA: 256)")
    parser.add_argument("--k", type=int, default=1000, help="number of clusters")
    parser.add_argument("--niter", type=int, default=20, help="Lloyd iterations for both (DeepCluster: 20)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OpenMP/BLAS threads for both")
    parser.add_argument("--blobs", type=int, default=None, help="Gaussian blobs in the data (default: k // 10)")
    parser.add_argument("--noise", type=float, default=1.0, help="blob standard deviation (centres: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="rounds of all methods, interleaved so that a load change hits all of them; the fastest is reported",
    )
    parser.add_argument("--skip-sklearn", action="store_true", help="faiss only")
    args = parser.parse_args()

    num_blobs = args.blobs if args.blobs is not None else max(1, args.k // 10)
    features = make_features(args.n, args.dim, num_blobs, args.noise, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    init_centroids = features[rng.choice(args.n, size=args.k, replace=False)].copy()
    methods = {name: fit for name, fit in METHODS.items() if not (args.skip_sklearn and "sklearn" in name)}
    faiss.omp_set_num_threads(args.threads)
    print(
        f"n={args.n} dim={args.dim} k={args.k} blobs={num_blobs} niter={args.niter} threads={args.threads} "
        f"faiss={faiss.__version__} sklearn={sklearn.__version__} load average={os.getloadavg()[0]:.1f}",
        flush=True,
    )

    results = {}
    with threadpool_limits(limits=args.threads):
        warm_up(args.dim)
        for _ in range(args.repeats):
            for name, fit in methods.items():
                start = time.perf_counter()
                centroids, niter = fit(features, init_centroids, args.niter, args.seed)
                seconds = time.perf_counter() - start
                result = results.setdefault(name, {"seconds": float("inf"), "all_seconds": []})
                result["all_seconds"].append(round(seconds, 3))
                if seconds < result["seconds"]:
                    result.update(seconds=seconds, niter=niter, seconds_per_iter=seconds / niter)
                result["inertia"] = nearest_inertia(features, centroids)
    for name, result in results.items():
        print(json.dumps({"method": name, **result}))

    if "sklearn.KMeans(lloyd)" in results:
        faiss_run, sk_run = results["faiss.Kmeans"], results["sklearn.KMeans(lloyd)"]
        if sk_run["niter"] != faiss_run["niter"]:
            print(f"note: sklearn stopped after {sk_run['niter']} iterations (labels stable); compare seconds_per_iter")
        print(
            f"sklearn / faiss time: {sk_run['seconds'] / faiss_run['seconds']:.2f}x "
            f"(per iteration {sk_run['seconds_per_iter'] / faiss_run['seconds_per_iter']:.2f}x); "
            f"inertia faiss {faiss_run['inertia']:.2f}, sklearn {sk_run['inertia']:.2f} "
            f"(sklearn / faiss {sk_run['inertia'] / faiss_run['inertia']:.5f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""raytrain_ssl: SimCLRv2-style self-supervised learning on Ray Train, Ray Data and Ray Tune."""

__version__ = "0.1.0"

"""``clickstream bench``: data-plane, orchestration, scale and skew measurements, side by side."""

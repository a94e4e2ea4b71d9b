"""The robustness study's experiment grids (``configs.py``) and its thin runner (``run.py``)."""

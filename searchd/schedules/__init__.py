"""Schedule families (baselines) and search spaces."""

from searchd.schedules.baselines import AYS_TABLES, FAMILIES, baseline, loglinear_interp

__all__ = ["AYS_TABLES", "FAMILIES", "baseline", "loglinear_interp"]

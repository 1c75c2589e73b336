"""Network-constrained DER dispatch: sparse LP (HiGHS), AC verification, ledger, baselines."""

# the largest export limit (either sign) any request may ask for [kW]: HiGHS reads a
# bound of 1e20 or more as none (a light module: the API's request models import it)
EXPORT_LIMIT_MAX_KW = 1e9

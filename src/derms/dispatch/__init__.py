"""Network-constrained DER dispatch: sparse LP (HiGHS), AC verification, ledger, baselines."""

from kernel_testing import poisoned  # noqa: F401  (fixture)

"""One module per numbered section of the benchmark; each has `SECTION` (a `harness.Section`)."""

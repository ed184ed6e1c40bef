"""`alignserve bench`: the side-by-side benchmark suite (see `bench.suite.cli`)."""

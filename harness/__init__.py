"""Local clusters for the demo, the tests and the benchmarks (not shipped: they start daemons as a
test fixture does). Production code never imports this package."""

"""Benchmarks: training throughput (`training`, with the step rate of fused groups in
`step_rate`), size and speed of the deployed student (`deploy`), and the description of
the machine they ran on (`machine`)."""

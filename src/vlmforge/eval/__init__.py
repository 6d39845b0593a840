"""Evaluation: the tasks (benchmarks and QA files), their metrics and the one evaluator."""

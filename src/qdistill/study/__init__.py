"""The study layer: the grid of runs of the task statement's four questions, their
paired seeds, how they are scheduled, and ``results.csv`` with its statistics.

This file stays torch-free: it holds the enumerations this layer owns, so the config
schema and the report can use them without importing torch.
"""

QUESTIONS = ("q1", "q2", "q3", "q4")
# Q1 ground truth; Q2 the teacher's soft targets; Q3 hard + c * soft (teacher);
# Q4 hard + c * soft built from the ground truth.
QUESTION_LOSS = {"q1": "hard", "q2": "soft", "q3": "hard+soft", "q4": "hard+softgt"}
# where a study's runs train: in this process, or as Ray tasks (`cluster.py`)
EXECUTORS = ("local", "ray")
# how a study spends its seeds: every seed of every arm, or a race (`race.py`)
SEARCHES = ("grid", "race")
RACE_TESTS = ("friedman", "t-holm")  # the race's tests (`racetests.py`)

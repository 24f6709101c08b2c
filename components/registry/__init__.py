"""The registry stage: MLflow registry versions and the aliases that decide what serves.

register (a run's model becomes a version), evaluation_set (the frozen test photos and each version's
training photos), promotion (moves @champion / @previous past promotion_gate, whose paired test is
significance), lease (one promotion of a model at a time), rollback.
"""

"""The training stage: a classifier trained with DDP under torchrun and recorded in MLflow.

train (the loop), train_data (datasets and loaders), checkpoints, distributed (process group), launch
(torchrun or one process), models (spec, building, safe loading), architectures (their names, without
torch, for the CLI), model_source (--model to a folder), weights (pretrained, never downloaded),
tracking and train_record (MLflow, rank 0 only), pyfunc_model.
"""

"""Everything that talks to the Kubernetes API: cluster training and the serving rollout.

kube_api (client, errors, polling), training_jobs (TrainJob / PyTorchJob manifests), job_watch and
job_failures (run a job, say why it failed), train_launch (the pipeline's train task: torchrun here or a
job there), serving_workloads and rollout (Deployment or InferenceService), deploy (the step).
"""

"""Training: the :class:`~medkd.train.task.Task` interface, the loop and its parts, the teacher task."""

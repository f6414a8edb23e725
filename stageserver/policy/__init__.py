"""What a stage may take: this worker's admission, and each principal's limits.

Both are stage listeners: a slot taken when a stage is admitted is given back the moment
it ends, whichever way. Limits shared across hosts live in Redis (``limits.RedisLimits``).
"""

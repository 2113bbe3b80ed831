"""Reading and writing Gemma checkpoints in every format users have."""
